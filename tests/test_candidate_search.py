import json
import re

import polars as pl
import torch

from src_assets.candidate_search import POOL_SCHEMA, SearchConfig, sentence_beam_search
from src_assets.models import load_policy
from src_assets.source_data import synthetic_source


def test_beam_search_gives_k_distinct_complete_candidates(trained_tiny_vlm):
    model, processor = load_policy(str(trained_tiny_vlm))
    prompts = synthetic_source(seed=1, n_sft=0, n_calibrate=5, n_eval=0)
    cfg = SearchConfig(k=3, beams=2, samples_per_beam=2, max_sentences=7, batch_size=7)  # batches split across prompts
    pool = sentence_beam_search(model, processor, prompts, cfg, seed=0, progress=False)
    assert pool.schema == pl.Schema(POOL_SCHEMA)
    per_prompt = pool.group_by("prompt_id").agg(
        pl.len(), pl.col("text").n_unique().alias("distinct"), pl.col("candidate").sort()
    )
    assert set(per_prompt["prompt_id"]) <= set(prompts["id"])
    assert (per_prompt["len"] <= 3).all() and (per_prompt["len"] == per_prompt["distinct"]).all()
    assert all(c == list(range(len(c))) for c in per_prompt["candidate"].to_list())
    assert per_prompt["len"].sum() >= 8  # most prompts reach K complete candidates
    assert (pool["logprob"] < 0).all() and (pool["n_tokens"] > 0).all()
    assert json.loads(pool["params"][0])["k"] == 3
    # Candidates are ranked by length-normalised log-probability, best first.
    for _, group in pool.group_by("prompt_id"):
        norm = (group.sort("candidate")["logprob"] / group.sort("candidate")["n_tokens"]).to_list()
        assert norm == sorted(norm, reverse=True)


def test_same_seed_same_pool(trained_tiny_vlm):
    model, processor = load_policy(str(trained_tiny_vlm))
    prompts = synthetic_source(seed=2, n_sft=0, n_calibrate=2, n_eval=0)
    cfg = SearchConfig(k=2, beams=2, samples_per_beam=2, max_sentences=7)
    a = sentence_beam_search(model, processor, prompts, cfg, seed=5, progress=False)
    b = sentence_beam_search(model, processor, prompts, cfg, seed=5, progress=False)
    assert a.equals(b)


def test_answer_and_rationale_are_parsed(trained_tiny_vlm):
    model, processor = load_policy(str(trained_tiny_vlm))
    pool = sentence_beam_search(
        model,
        processor,
        synthetic_source(seed=3, n_sft=0, n_calibrate=4, n_eval=0),
        SearchConfig(k=3, beams=2, samples_per_beam=2, max_sentences=7),
        progress=False,
    )
    for row in pool.iter_rows(named=True):
        answer_lines = list(re.finditer(r"answer\s*:", row["text"], re.IGNORECASE))
        if answer_lines and row["text"][answer_lines[-1].end() :].strip(" ."):
            assert row["answer"] is not None and row["rationale"] == row["text"][: answer_lines[-1].start()].strip()
        else:
            assert row["answer"] is None


def test_the_greedy_response_joins_the_pool(trained_tiny_vlm):
    from src_assets.generation import generate_responses

    model, processor = load_policy(str(trained_tiny_vlm))
    prompts = synthetic_source(seed=6, n_sft=0, n_calibrate=12, n_eval=0)
    cfg = SearchConfig(k=4, beams=1, samples_per_beam=1, max_sentences=7, temperature=3.0)
    pool = sentence_beam_search(model, processor, prompts, cfg, seed=0, progress=False)
    budget = cfg.max_sentences * cfg.max_sentence_tokens
    greedy = generate_responses(
        model, processor, prompts["question"].to_list(), prompts["image"].to_list(), max_new_tokens=budget
    )
    norm = lambda t: " ".join(t.replace(".", " . ").replace(":", " : ").replace(",", " , ").split())
    # A greedy response that ended (the end token before the budget) joins the pool; this briefly trained policy
    # does not end every one.
    ended = [(pid, t) for pid, t in zip(prompts["id"], greedy) if len(processor.tokenizer(t)["input_ids"]) < budget]
    assert ended
    for pid, text in ended:
        texts = [norm(t) for t in pool.filter(pl.col("prompt_id") == pid)["text"]]
        assert norm(text) in texts


def test_continuing_the_prompt_cache_gives_what_re_encoding_gives(trained_tiny_vlm):
    """Prompt and image encoded once, continued with padding between prompt and beam: the same greedy tokens and
    log-probs as re-encoding each row from scratch."""
    from src_assets.candidate_search import _generate, _Prompts, reuses_prompt_cache, sentence_stop_ids
    from src_assets.generation import collate_prompts, prompt_inputs

    model, processor = load_policy(str(trained_tiny_vlm))
    assert reuses_prompt_cache(model)
    rows = synthetic_source(seed=8, n_sft=0, n_calibrate=4, n_eval=0)
    inputs = [prompt_inputs(processor, q, i) for q, i in zip(rows["question"], rows["image"])]
    pad = processor.tokenizer.pad_token_id
    words = processor.tokenizer.convert_tokens_to_ids(["there", "is", "a", "red", "circle"])
    index, extra = [0, 1, 2, 3, 1], [(), tuple(words), tuple(words[:2]), (), tuple(words[:4])]
    prompts = _Prompts(model, inputs, pad)
    assert prompts.cache is not None
    stop = sentence_stop_ids(processor.tokenizer, ".")
    batch, cache = prompts.batch(index, extra)
    cached = _generate(model, batch, pad, stop, 12, False, 1.0, cache)
    fresh = _generate(model, collate_prompts([inputs[i] for i in index], extra, pad), pad, stop, 12, False, 1.0)
    assert cached[0] == fresh[0]
    torch.testing.assert_close(torch.tensor(cached[1]), torch.tensor(fresh[1]), atol=1e-4, rtol=1e-5)
