import random

import polars as pl
import pytest
import torch

from src_assets.judge import (
    VERDICTS,
    JudgeConfig,
    batch_ranges,
    independent_matrices,
    judge,
    judge_prompt,
    pairwise_matrices,
    train_judge,
    verdict_continuations,
    verdict_fit,
    verdict_probabilities,
)
from src_assets.judge_corpus import (
    candidate_judgements,
    contrast_judgements,
    judge_training_set,
    perturbed_responses,
    user_judgements,
)
from src_assets.models import load_judge_model
from src_assets.scenes import Question, Scene, gold_response
from src_assets.source_data import synthetic_source
from src_assets.training import TrainSettings
from src_assets.verifier import (
    judge_agreement,
    quality,
    verifier_matrices,
    verifier_verdict,
    verify,
)


@pytest.fixture(scope="module")
def judge_lm(tiny_dirs):
    return load_judge_model(str(tiny_dirs[1]))


@pytest.fixture(scope="module")
def prompts():
    return synthetic_source(seed=3, n_sft=0, n_calibrate=3, n_eval=0)


def _pool(prompts):
    rows = []
    for r in prompts.iter_rows(named=True):
        wrong = "there is a red circle at the top left. so there is no red circle.\nAnswer: seven"
        for c, text in enumerate([r["response"], wrong, r["response"].split("\n")[0] + "\nAnswer: nine"]):
            rows.append({"prompt_id": r["id"], "candidate": c, "text": text})
    return pl.DataFrame(rows)


def test_verdict_tokens_are_distinct_and_known(judge_lm):
    _, tok = judge_lm
    _, tails = verdict_continuations(tok, ["question : how many ? verdict :"])
    assert tails[0] == [[tok.convert_tokens_to_ids(v)] for v in ("A", "B", "tie")]  # word-level: one token each


@pytest.fixture(scope="module")
def bpe_judge_dir(tmp_path_factory):
    from src_assets.tiny_models import TinySpec, build_tiny_judge

    return build_tiny_judge(
        tmp_path_factory.mktemp("bpe_judge"), "qwen2", TinySpec(hidden_size=32, intermediate_size=64, num_layers=1)
    )


def test_bpe_verdicts_are_the_tokens_training_puts_after_the_prompt(bpe_judge_dir):
    """Byte-level BPE: " A" is one "ĠA" token, not "A"; " tie" is several tokens here, and all are read."""
    from src_assets.models import load_tokenizer

    tok = load_tokenizer(str(bpe_judge_dir))
    prompt = "question : how many red shapes are there ? verdict :"
    _, tails = verdict_continuations(tok, [prompt])
    assert [tok.convert_ids_to_tokens(t) for t in tails[0][:2]] == [["ĠA"], ["ĠB"]]
    assert len(tails[0][2]) > 1 and tok.decode(tails[0][2]) == " tie"
    trained = tok(prompt + " tie")["input_ids"]
    assert trained[-len(tails[0][2]) :] == tails[0][2]


@pytest.mark.parametrize("verdict, index", [("A", 0), ("tie", 2)])
def test_a_bpe_judge_trained_on_one_verdict_reads_it_back(bpe_judge_dir, tmp_path, prompts, verdict, index):
    """Trained on all-A (or all-tie) labels, the judge reads back P(verdict) > 0.9: the tokens read are the
    tokens trained, including every sub-token of a multi-token "tie"."""
    from src_assets.models import load_tokenizer

    tok = load_tokenizer(str(bpe_judge_dir))
    rows = candidate_judgements(_pool(prompts), prompts, tok).with_columns(
        pl.lit(f" {verdict}").alias("completion"), pl.lit(verdict).alias("verdict")
    )
    rows = pl.concat([rows] * 6)
    train_judge(str(bpe_judge_dir), rows, str(tmp_path), TrainSettings(epochs=2, learning_rate=1e-2, batch_size=8))
    model, tok = load_judge_model(str(tmp_path))
    probs = verdict_probabilities(model, tok, rows["prompt"].head(6).to_list())
    assert probs[:, index].min() > 0.9
    expected = 1.0 if verdict == "A" else 0.5
    torch.testing.assert_close(
        judge(model, tok, rows["prompt"].head(6).to_list()), torch.full((6,), expected), atol=0.06, rtol=0
    )


def test_user_judgements_train_both_orders_with_the_verdict_swapped(judge_lm):
    _, tok = judge_lm
    table = pl.DataFrame(
        {
            "question": ["how many red shapes are there?"],
            "response_a": ["there is one. Answer: one"],
            "response_b": ["there are two. Answer: two"],
            "verdict": ["B"],
            "reference": [None],
            "answer": ["two"],
        }
    )
    rows = user_judgements(table, tok)
    assert rows["verdict"].to_list() == ["B", "A"] and rows["completion"].to_list() == [" B", " A"]
    assert rows["prompt"][0].index("Answer: one") < rows["prompt"][0].index("Answer: two")
    assert rows["prompt"][1].index("Answer: two") < rows["prompt"][1].index("Answer: one")


def test_judge_reads_only_the_last_position(judge_lm, monkeypatch):
    model, tok = judge_lm
    seen = {}
    original = model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        out = original(*args, **kwargs)
        seen["logits_shape"] = tuple(out.logits.shape)
        return out

    monkeypatch.setattr(model, "forward", spy)
    p = judge(model, tok, ["question : how many red shapes are there ? verdict :"] * 2)
    assert seen["logits_to_keep"] == 1 and seen["logits_shape"][1] == 1
    assert ((p >= 0) & (p <= 1)).all()


def test_left_padding_does_not_change_a_verdict(judge_lm):
    model, tok = judge_lm
    short = "question : how many red shapes are there ? verdict :"
    long = short.replace("?", "? there is a red circle at the top left . there is a blue square at the middle center .")
    alone = judge(model, tok, [short])
    padded = judge(model, tok, [long, short])
    torch.testing.assert_close(alone[0], padded[1], atol=1e-5, rtol=1e-5)


def test_every_ordered_pair_is_judged(judge_lm, prompts):
    model, tok = judge_lm
    pool = _pool(prompts)
    ids, matrices = pairwise_matrices(model, tok, pool, prompts, progress=False)
    assert ids == prompts["id"].to_list()
    for m in matrices:
        assert len(m) == 3 and all(m[i][i] == 0.5 for i in range(3))
        assert all(0 <= m[i][j] <= 1 for i in range(3) for j in range(3))
    # A prompt without candidates gets an empty matrix.
    ids, matrices = pairwise_matrices(model, tok, pool.filter(pl.col("prompt_id") != ids[0]), prompts, progress=False)
    assert matrices[0] == []


def test_batches_start_at_every_break():
    assert batch_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_ranges(10, 4, [3, 7]) == [(0, 3), (3, 7), (7, 10)]
    assert batch_ranges(10, 2, [0, 5, 10, 12]) == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]
    assert batch_ranges(0, 4) == []


@pytest.mark.parametrize("judge_all", [pairwise_matrices, independent_matrices])
def test_a_prompt_judged_in_its_block_scores_as_it_does_judged_alone(judge_lm, judge_all):
    """Shards cut between blocks: each must give the bits that one shard gives. Batches of 4 texts would otherwise
    span two prompts, whose candidates' lengths differ, and padding changes the last bits of a score."""
    model, tok = judge_lm
    prompts = synthetic_source(seed=3, n_sft=0, n_calibrate=4, n_eval=0)
    sentence = "there is a red circle at the top left. "
    pool = pl.DataFrame(
        [
            {"prompt_id": r["id"], "candidate": c, "text": text}
            for n, r in enumerate(prompts.iter_rows(named=True))
            for c, text in enumerate([r["response"], sentence * (1 + 2 * n) + "\nAnswer: nine", "so.\nAnswer: seven"])
        ]
    )
    cfg = JudgeConfig(batch_size=4)
    ids, whole = judge_all(model, tok, pool, prompts, cfg, progress=False, block=1)
    for i, pid in enumerate(ids):
        _, alone = judge_all(model, tok, pool, prompts.slice(i, 1), cfg, progress=False, block=1)
        assert alone[0] == whole[i], pid  # bit for bit


def test_independent_scoring_builds_a_consistent_matrix(judge_lm, prompts):
    model, tok = judge_lm
    _, matrices = independent_matrices(model, tok, _pool(prompts), prompts, progress=False)
    m = torch.tensor(matrices[0])
    torch.testing.assert_close(m + m.T, torch.ones(3, 3))


def test_verifier_labels_prefer_the_gold_response(judge_lm, prompts):
    _, tok = judge_lm
    rows = candidate_judgements(_pool(prompts), prompts, tok)
    assert rows.height == 3 * 6  # ordered pairs of 3 candidates, per prompt
    gold = prompts["response"][0]
    first_is_gold = rows.filter(pl.col("prompt").str.contains(f"candidate A : {gold}", literal=True))
    assert set(first_is_gold["verdict"]) == {"A"}
    assert rows["completion"].str.strip_chars().is_in(["A", "B", "tie"]).all()


def test_judge_contrast_pairs_sets_the_contrast_pairs_and_zero_trains_on_none(tiny_dirs, judge_lm, prompts):
    """One contrast mechanism, one setting: ``contrast_pairs`` pairs of gold responses against their perturbed
    copies join the policy's own candidate pairs, and 0 means none at all."""
    from src_assets.candidate_search import SearchConfig
    from src_assets.models import Runtime
    from src_assets.source_data import JUDGEMENT_SCHEMA

    _, tok = judge_lm
    sft_rows = synthetic_source(seed=8, n_sft=10, n_calibrate=0, n_eval=0)
    common = dict(
        policy_dir=str(tiny_dirs[0]),
        runtime=Runtime("cpu", "float32"),
        prompts=prompts,
        search=SearchConfig(k=3, beams=2, samples_per_beam=2, max_sentences=4),
        contrast_rows=sft_rows,
        user_table=pl.DataFrame(schema=JUDGEMENT_SCHEMA),
        max_pairs=1000,
        seed=0,
    )
    none, counts = judge_training_set(tok, JudgeConfig(), contrast_pairs=0, **common)
    assert counts["contrast_pairs"] == 0 and none.height == counts["candidate_pairs"] > 0
    gold = [*prompts["response"], *sft_rows["response"]]
    for text in gold:  # no judge prompt holds a gold response: every pair is two of the policy's candidates
        assert not none["prompt"].str.contains(f"candidate A : {text}", literal=True).any()

    some, counts = judge_training_set(tok, JudgeConfig(), contrast_pairs=20, **common)
    assert counts == {"candidate_pairs": none.height, "contrast_pairs": 20, "user_pairs": 0}
    assert some.head(none.height).equals(none)  # the same candidate pairs, then the contrast pairs
    # ... and those are gold responses against their perturbed copies: the contrast corpus of the same rows.
    corpus = contrast_judgements(pl.concat([prompts, sft_rows], how="diagonal_relaxed"), tok, JudgeConfig(), 20, 0)
    assert some.tail(20).equals(corpus)


def test_contrast_corpus_labels_every_ordered_pair_of_gold_and_its_mistakes(judge_lm):
    _, tok = judge_lm
    rows = synthetic_source(seed=8, n_sft=30, n_calibrate=0, n_eval=0)
    corpus = contrast_judgements(rows, tok)
    assert corpus.height >= 30 * 12  # gold and at least three mistakes per row, every ordered pair
    # Each mistake is of its kind, and gold wins against the wrong answer and against the slipped step.
    for r in rows.head(10).iter_rows(named=True):
        scene, question = Scene.from_json(r["scene"]), Question.from_json(r["question_spec"])
        gold = verify(gold_response(scene, question), scene, question)
        mistakes = [verify(x, scene, question) for x in perturbed_responses(scene, question, random.Random(0))]
        wrong_answer, slipped, wrong_conclusion = mistakes[0], mistakes[-2], mistakes[-1]
        assert wrong_answer.steps_follow and not wrong_answer.answer_is_conclusion and not wrong_answer.correct
        assert not slipped.steps_follow and slipped.factuality == 1.0
        assert wrong_conclusion.steps_follow and not wrong_conclusion.conclusion_follows_steps
        assert wrong_conclusion.answer_is_conclusion and not wrong_conclusion.correct
        for mistake in (wrong_answer, slipped):
            assert verifier_verdict(quality(gold), quality(mistake)) == "A"
    assert set(corpus["verdict"]) == {"A", "B", "tie"}
    assert (
        corpus["prompt"].str.ends_with("verdict :").all()
        and corpus["prompt"].str.contains(" answers : reference ").all()
    )
    assert contrast_judgements(rows, tok, max_pairs=50).height == 50


def test_instruct_template_uses_the_chat_template(judge_lm):
    _, tok = judge_lm
    text = judge_prompt(
        tok, {"question": "how many?", "reference": "ref", "answer": "two"}, "x", "y", template="instruct"
    )
    assert "Response A:" in text and "Reply with one word" in text
    with pytest.raises(ValueError, match="unknown judge template"):
        judge_prompt(tok, {"question": "q", "reference": "r", "answer": None}, "a", "b", template="verbose")


def test_training_teaches_the_verdict(tiny_dirs, tmp_path, prompts):
    _, tok = load_judge_model(str(tiny_dirs[1]))
    rows = candidate_judgements(_pool(prompts), prompts, tok).filter(pl.col("verdict") == "A")
    rows = pl.concat([rows] * 8)
    train_judge(str(tiny_dirs[1]), rows, str(tmp_path), TrainSettings(epochs=3, learning_rate=1e-2, batch_size=8))
    model, tok = load_judge_model(str(tmp_path))
    assert judge(model, tok, rows["prompt"].head(4).to_list()).min() > 0.8


def test_verifier_judge_prefers_the_gold_response_and_agrees_with_itself(prompts):
    pool = _pool(prompts)
    ids, matrices = verifier_matrices(pool, prompts)
    assert ids == prompts["id"].to_list()
    for m in matrices:
        assert m[0][1] == 1.0 and m[1][0] == 0.0  # gold beats the wrong, inconsistent response
        assert all(m[i][i] == 0.5 for i in range(3))
        assert all(m[i][j] + m[j][i] == 1.0 for i in range(3) for j in range(3))
    result = judge_agreement(ids, matrices, pool, prompts)
    assert result["judge_agreement"] == 1.0 and result["clear_pairs"] > 0
    flipped = [[[1 - x for x in row] for row in m] for m in matrices]
    assert judge_agreement(ids, flipped, pool, prompts)["judge_agreement"] == 0.0


def test_verifier_judge_refuses_prompts_without_a_scene(prompts):
    no_scene = prompts.with_columns(pl.lit(None, pl.String).alias("scene"))
    with pytest.raises(ValueError, match="has no scene"):
        verifier_matrices(_pool(prompts), no_scene)


@pytest.mark.parametrize("judge_kind", ["word_level", "bpe"])
def test_a_shared_prompt_prefix_encoded_once_gives_the_same_verdicts(judge_kind, judge_lm, bpe_judge_dir, prompts):
    """A prompt's pairs share question and reference, which are encoded once and continued: the verdict
    probabilities equal those of each judge prompt encoded alone (batch of one), single- and multi-token verdicts."""
    from src_assets.judge import _SharedPrefixes, _verdict_logprobs, verdict_continuations

    model, tok = judge_lm if judge_kind == "word_level" else load_judge_model(str(bpe_judge_dir))
    row = prompts.row(0, named=True)
    texts = [
        judge_prompt(tok, row, a, b)
        for a, b in (
            (row["response"], "no idea. Answer: one"),
            ("no idea. Answer: one", row["response"]),
            (row["response"], row["response"]),
        )
    ]
    ids, _ = verdict_continuations(tok, texts)
    assert min(_SharedPrefixes(model, ids, tok.pad_token_id).shared) > 10  # the question and reference are shared
    together = verdict_probabilities(model, tok, texts, batch_size=8)
    alone = []
    for text in texts:  # each encoded whole, no cache: every verdict's tokens scored after the full prompt
        one, tails = verdict_continuations(tok, [text])
        uncached = _SharedPrefixes(model, one, tok.pad_token_id, min_shared=10**9)
        assert uncached.cache is None
        alone.append(torch.stack([_verdict_logprobs(uncached, one, [tails[0][v]]) for v in range(3)], 1).softmax(-1))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)


def _plain_verdicts(model, tok, prompts: list[str]) -> torch.Tensor:
    """P(A), P(B), P(tie) from one plain forward pass per prompt and verdict: no batch, no padding, no cache, the
    model's own positions; each verdict's tokens (those training puts after the prompt) scored in turn."""
    ids, tails = verdict_continuations(tok, prompts)
    out = []
    with torch.no_grad():
        for row, row_tails in zip(ids, tails):
            logps = []
            for tail in row_tails:
                logits = model(input_ids=torch.tensor([row + tail])).logits[0].float().log_softmax(-1)
                logps.append(sum(logits[len(row) - 1 + i, t] for i, t in enumerate(tail)))
            out.append(torch.stack(logps).softmax(-1))
    return torch.stack(out)


@pytest.mark.parametrize("judge_kind", ["word_level", "bpe"])
def test_verdicts_through_batches_and_the_prefix_cache_equal_a_plain_forward_pass(
    judge_kind, judge_lm, bpe_judge_dir, prompts
):
    """The read-out the pipeline uses (left-padded batches, a shared prefix encoded once, positions counted from
    each row's first token) gives what the model says about each prompt read alone."""
    model, tok = judge_lm if judge_kind == "word_level" else load_judge_model(str(bpe_judge_dir))
    torch.manual_seed(0)
    with torch.no_grad():  # weights far from their tiny initialisation, so that a wrong position shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    texts = []
    for row in prompts.iter_rows(named=True):  # a prompt's pairs share a long prefix; prompts differ in length
        wrong = row["response"].split("\n")[0] + "\nAnswer: nine"
        texts += [judge_prompt(tok, row, row["response"], wrong), judge_prompt(tok, row, wrong, row["response"])]
    texts.append("question : how many red shapes are there ? verdict :")
    torch.testing.assert_close(
        verdict_probabilities(model, tok, texts, batch_size=4), _plain_verdicts(model, tok, texts), atol=1e-5, rtol=1e-4
    )


def test_training_puts_its_loss_on_the_tokens_and_position_the_read_out_reads(judge_lm, prompts):
    """TRL's collated batch (right padding, completion-only labels) labels exactly the verdict's tokens right after
    each prompt, and the model's logits there are those the read-out reads after the prompt alone."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = judge_lm
    rows = candidate_judgements(_pool(prompts), prompts, tok)
    rows = pl.concat(
        [
            rows.head(3),
            pl.DataFrame({"prompt": ["question : how many ? verdict :"], "completion": [" B"], "verdict": ["B"]}),
        ]
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir="unused", use_cpu=True, completion_only_loss=True, report_to=[]),
        train_dataset=Dataset.from_dict(
            {"prompt": rows["prompt"].to_list(), "completion": rows["completion"].to_list()}
        ),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows.height)])
    ids, tails = verdict_continuations(tok, rows["prompt"].to_list())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for r, verdict in enumerate(rows["verdict"]):
            labelled = batch["labels"][r][batch["labels"][r] != -100].tolist()
            tail = tails[r][VERDICTS.index(verdict)]
            assert labelled[: len(tail)] == tail and labelled[len(tail) :] in ([], [tok.eos_token_id])
            start = len(ids[r])  # the first verdict token sits right after the prompt
            assert batch["input_ids"][r, :start].tolist() == ids[r]
            read = model(input_ids=torch.tensor([ids[r]])).logits[0, -1]
            torch.testing.assert_close(logits[r, start - 1], read, atol=1e-5, rtol=1e-4)


def test_every_judge_corpus_has_as_many_a_as_b_verdicts(judge_lm, prompts):
    """Every ordered pair is labelled in both orders, so a judge cannot win by preferring a position."""
    _, tok = judge_lm
    corpora = [
        candidate_judgements(_pool(prompts), prompts, tok),
        contrast_judgements(synthetic_source(seed=8, n_sft=20, n_calibrate=0, n_eval=0), tok),
    ]
    for corpus in corpora:
        counts = dict(corpus.group_by("verdict").len().iter_rows())
        assert counts["A"] == counts["B"] > 0


def test_verdict_fit_tells_a_judge_that_reads_its_prompt_from_one_that_learned_the_prior(tiny_dirs, tmp_path):
    """Trained on verdicts its prompt states, the judge reads them back; trained on verdicts unrelated to the
    prompt, it learns their prior, and ``verdict_fit`` says so (fit at the prior, no spread)."""
    _, tok = load_judge_model(str(tiny_dirs[1]))
    rng = random.Random(0)
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "top", "left", "middle"]
    stated = pl.DataFrame(
        [
            {"prompt": f"question : {' '.join(rng.choices(words, k=6))} candidate {v} verdict :", "verdict": v}
            for _ in range(40)
            for v in ("A", "B", "tie")
        ]
    ).with_columns((pl.lit(" ") + pl.col("verdict")).alias("completion"))
    unrelated = stated.with_columns(
        pl.Series("verdict", rng.choices(["A", "B", "tie"], weights=[1, 1, 2], k=stated.height))
    ).with_columns((pl.lit(" ") + pl.col("verdict")).alias("completion"))
    settings = TrainSettings(epochs=4, learning_rate=1e-2, batch_size=8)
    fits = {}
    for name, rows in (("stated", stated), ("unrelated", unrelated)):
        train_judge(str(tiny_dirs[1]), rows, str(tmp_path / name), settings)
        fits[name] = verdict_fit(*load_judge_model(str(tmp_path / name)), rows)
    assert fits["stated"]["fit"] >= 0.95 and fits["stated"]["verdict_spread"] > 0.3, fits
    assert fits["unrelated"]["fit"] <= fits["unrelated"]["prior_fit"] + 0.05, fits
    assert fits["unrelated"]["verdict_spread"] < 0.1, fits
