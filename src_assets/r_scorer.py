"""Stage 3: the R-Scorer, a text-only judge LM that compares two candidates of one prompt.

It reads the question, a reference (the image's reference description and the
ground-truth answer) and candidates A and B, and its verdict is read from the
next-token distribution over the verdict tokens {A, B, tie}:
``p(i first, j second) = P(A) + P(tie) / 2``, the three renormalised among
themselves. Only the last position's logits are computed (``logits_to_keep=1``).

Training labels come from the domain verifier (the teacher, as a large judge
model is in the paper), or from a user's table of judgements; the judge is
trained with TRL's ``SFTTrainer`` on the verdict token alone. Any pretrained
instruction-tuned causal LM can be used zero-shot instead, with the
``instruct`` prompt template.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import permutations

import polars as pl
import torch

from kernels.pairwise import debias

from .generation import cache_rows, left_padded
from .progress import Progress, ProgressBar
from .scenes import COLORS, COLUMNS, NUMBER_WORDS, ROWS, Question, Scene
from .verifier import split_response, verify

VERDICTS = ("A", "B", "tie")
JUDGE_TEMPLATES = ("compact", "instruct")
INSTRUCTION = (
    "You judge two responses to a question about an image you cannot see; the reference describes it. "
    "Prefer the response whose rationale states true facts about the image and whose final answer follows from "
    "its own rationale and is correct. Reply with one word: A, B, or tie."
)


@dataclass(frozen=True)
class JudgeConfig:
    template: str = "compact"  # "compact" (the tiny judge) or "instruct" (a chat model used zero-shot)
    batch_size: int = 128
    # Verifier labels: quality = weighted correctness + factuality + consistency; gaps up to tie_margin are ties.
    quality_weights: tuple[float, float, float] = (2.0, 1.0, 2.0)
    tie_margin: float = 0.5


def judge_prompt(
    tokenizer, question: str, reference: str, answer: str | None, first: str, second: str, template: str = "compact"
) -> str:
    ref = f"{reference} Answer : {answer}" if answer else reference
    if template == "compact":
        # The final answers again, side by side just before the verdict: a small judge compares tokens that sit
        # a few positions apart long before it learns to find them across the whole prompt.
        recap = " ".join(f"{who} {split_response(text)[1] or 'none'}" for who, text in (("A", first), ("B", second)))
        gold = f"reference {answer} " if answer else ""
        return (
            f"question : {question} reference : {ref} candidate A : {first} candidate B : {second} "
            f"answers : {gold}{recap} verdict :"
        )
    if template == "instruct":
        body = f"Question: {question}\nReference: {ref}\n\nResponse A:\n{first}\n\nResponse B:\n{second}\n\nVerdict:"
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown judge template {template!r}; expected one of {JUDGE_TEMPLATES}")


def verdict_completion(verdict: str) -> str:
    """The text a judge is trained to write after its prompt, and whose probability is read back."""
    return f" {verdict}"


def _common_prefix(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:  # the usual case, compared in C
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def verdict_continuations(tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each prompt's token ids, and the tokens each verdict adds after it: exactly the tokens training put there.

    TRL's ``SFTTrainer`` tokenizes ``prompt`` and ``prompt + completion`` each with the tokenizer's defaults and
    trains on where they diverge; this does the same. With a word-level vocabulary a verdict is one token; a
    byte-level BPE gives ``" A"`` as ``ĠA``; ``" tie"`` may be several tokens, and all of them are scored.
    """
    base = tokenizer(prompts)["input_ids"]
    tails = [[] for _ in prompts]
    for verdict in VERDICTS:
        full = tokenizer([p + verdict_completion(verdict) for p in prompts])["input_ids"]
        for r, (b, f) in enumerate(zip(base, full)):
            n = _common_prefix(b, f)
            tail = f[n:]
            if n < len(b) or (tokenizer.eos_token_id is not None and tail[-1:] == [tokenizer.eos_token_id]):
                tail = [t for t in tail if t != tokenizer.eos_token_id]
            tails[r].append(tail)
    for r, t in enumerate(tails):
        if any(not x for x in t) or len({tuple(x) for x in t}) != len(VERDICTS) or tokenizer.unk_token_id in sum(t, []):
            raise ValueError(
                f"the judge's tokenizer does not give the verdicts {VERDICTS} distinct known tokens after "
                f"judge prompt {r}: {t}"
            )
    return base, tails


class _SharedPrefixes:
    """Consecutive judge prompts that begin alike, encoded once: a prompt's K(K-1) pairs share the question and
    the reference, which go into a KV cache that every pair of the group continues. Positions are counted from
    each row's first real token, as in training, across the padding between the cached prefix and the rest."""

    def __init__(self, model, ids: list[list[int]], pad_id: int, min_shared: int = 8):
        self.model, self.pad_id, self.group, self.shared = model, pad_id, [], []
        prefixes, r = [], 0
        while r < len(ids):
            n, end = len(ids[r]) - 1, r + 1  # each row keeps at least its last token out of the cache
            while end < len(ids):
                m = min(n, _common_prefix(ids[r], ids[end]), len(ids[end]) - 1)
                if m < min_shared:
                    break
                n, end = m, end + 1
            n = n if n >= min_shared else 0
            prefixes.append(ids[r][:n])
            self.group += [len(prefixes) - 1] * (end - r)
            self.shared += [n] * (end - r)
            r = end
        self.ids, self.mask = left_padded(prefixes, pad_id)
        self.cache = None
        if self.ids.shape[1]:
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            self.cache = model(
                input_ids=self.ids.to(model.device),
                attention_mask=self.mask.to(model.device),
                position_ids=positions.to(model.device),
                use_cache=True,
                logits_to_keep=1,
            ).cache

    def last_logits(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """The logits of the last ``keep`` positions of each full sequence (row r of the prompts it was built on)."""
        rest, rest_mask = left_padded([s[n:] for s, n in zip(seqs, self.shared)], self.pad_id)
        device = self.model.device
        if self.cache is None:
            positions = (rest_mask.cumsum(-1) - 1).clamp(min=0)
            return self.model(
                input_ids=rest.to(device),
                attention_mask=rest_mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            ).logits
        mask = torch.cat([self.mask[self.group], rest_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, self.ids.shape[1] :]
        return self.model(
            input_ids=rest.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            cache=cache_rows(self.cache, self.group),
            logits_to_keep=keep,
        ).logits


def _verdict_logprobs(prefixes: _SharedPrefixes, ids: list[list[int]], tails: list[list[int]]) -> torch.Tensor:
    """log P(tail | ids) for each row, in one batched forward."""
    keep = max(map(len, tails)) + 1
    logp = prefixes.last_logits([b + t for b, t in zip(ids, tails)], keep).float().log_softmax(-1)
    out = torch.zeros(len(ids), device=logp.device)
    for r, t in enumerate(tails):
        # logits at kept position j predict the token at sequence position width - keep + j + 1
        for i, token in enumerate(t):
            out[r] += logp[r, keep - len(t) - 1 + i, token]
    return out


@torch.no_grad()
def verdict_probabilities(
    model, tokenizer, prompts: list[str], batch_size: int = 128, progress: Progress = False
) -> torch.Tensor:
    """[prompts, 3]: P(A), P(B), P(tie) after each judge prompt, each verdict's whole token sequence scored and the
    three renormalised among themselves."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    bar = ProgressBar(len(prompts), "judging pairs", progress)
    for start in range(0, len(prompts), batch_size):
        ids, tails = verdict_continuations(tokenizer, prompts[start : start + batch_size])
        prefixes = _SharedPrefixes(model, ids, pad_id)
        if all(len(t) == 1 for row in tails for t in row):  # one forward: every verdict is one token
            logits = prefixes.last_logits(ids, 1)[:, -1]
            index = torch.tensor([[t[0] for t in row] for row in tails], device=logits.device)
            logp = logits.float().log_softmax(-1).gather(1, index)
        else:
            logp = torch.stack(
                [_verdict_logprobs(prefixes, ids, [row[v] for row in tails]) for v in range(len(VERDICTS))], 1
            )
        out.append(logp.softmax(-1).cpu())
        bar.update(len(ids))
    bar.close()
    return torch.cat(out) if out else torch.empty(0, len(VERDICTS))


def judge(model, tokenizer, prompts: list[str], batch_size: int = 128, progress: Progress = False) -> torch.Tensor:
    """p(first beats second) for each judge prompt: ``P(A) + P(tie) / 2``."""
    probs = verdict_probabilities(model, tokenizer, prompts, batch_size, progress)
    return probs[:, 0] + probs[:, 2] / 2


def _prompts_with_candidates(candidates: pl.DataFrame, prompts: pl.DataFrame):
    """(prompt id, prompt row, candidate texts in candidate order) for each prompt, in the prompts' order."""
    by_prompt = {pid: g.sort("candidate")["text"].to_list() for (pid,), g in candidates.group_by("prompt_id")}
    for row in prompts.select("id", "question", "reference", "answer").iter_rows(named=True):
        yield row["id"], row, by_prompt.get(row["id"], [])


def pairwise_matrices(
    model,
    tokenizer,
    candidates: pl.DataFrame,
    prompts: pl.DataFrame,
    cfg: JudgeConfig = JudgeConfig(),
    progress: Progress = True,
) -> tuple[list[str], list[list[list[float]]]]:
    """Every ordered pair of every prompt's candidates judged; returns prompt ids and K x K matrices (diagonal 0.5)."""
    ids, matrices, texts, index = [], [], [], []
    for pid, row, cands in _prompts_with_candidates(candidates, prompts):
        ids.append(pid)
        matrices.append([[0.5] * len(cands) for _ in cands])
        for i, j in permutations(range(len(cands)), 2):
            texts.append(
                judge_prompt(
                    tokenizer, row["question"], row["reference"] or "", row["answer"], cands[i], cands[j], cfg.template
                )
            )
            index.append((len(ids) - 1, i, j))
    for (b, i, j), p in zip(index, judge(model, tokenizer, texts, cfg.batch_size, progress).tolist()):
        matrices[b][i][j] = p
    return ids, matrices


def independent_matrices(
    model,
    tokenizer,
    candidates: pl.DataFrame,
    prompts: pl.DataFrame,
    cfg: JudgeConfig = JudgeConfig(),
    progress: Progress = True,
) -> tuple[list[str], list[list[list[float]]]]:
    """The ablation of pairwise judging: each candidate judged alone, against an empty response, in both orders.

    Its score ``s_i`` becomes a matrix ``p_ij = sigmoid(logit s_i - logit s_j)`` so that aggregation and curation
    run unchanged; only the judge's view differs (one candidate at a time instead of two side by side).
    """
    ids, texts, sizes = [], [], []
    for pid, row, cands in _prompts_with_candidates(candidates, prompts):
        ids.append(pid)
        sizes.append(len(cands))
        for c in cands:
            for first, second in ((c, ""), ("", c)):
                texts.append(
                    judge_prompt(
                        tokenizer, row["question"], row["reference"] or "", row["answer"], first, second, cfg.template
                    )
                )
    probs = judge(model, tokenizer, texts, cfg.batch_size, progress).view(-1, 2) if texts else torch.empty(0, 2)
    alone = debias(probs[:, 0], probs[:, 1]).clamp(1e-4, 1 - 1e-4)  # candidate first vs. empty, empty first vs. it
    logit = torch.log(alone) - torch.log1p(-alone)
    matrices, start = [], 0
    for k in sizes:
        l = logit[start : start + k]
        matrices.append(torch.sigmoid(l[:, None] - l[None, :]).fill_diagonal_(0.5).tolist() if k else [])
        start += k
    return ids, matrices


VERIFIER_JUDGE = "verifier"  # the scorer_model value that makes the domain verifier the judge (the oracle bound)
VERDICT_VALUE = {"A": 1.0, "B": 0.0, "tie": 0.5}  # p(first beats second) that each verdict stands for


def verifier_verdict(quality_first: float, quality_second: float, tie_margin: float) -> str:
    """The teacher's verdict on an ordered pair: the better quality wins unless the gap is within ``tie_margin``."""
    gap = quality_first - quality_second
    return "A" if gap > tie_margin else "B" if gap < -tie_margin else "tie"


def verifier_matrices(
    candidates: pl.DataFrame, prompts: pl.DataFrame, cfg: JudgeConfig = JudgeConfig(), progress: Progress = True
) -> tuple[list[str], list[list[list[float]]]]:
    """The oracle judge: ``p_ij`` is 1, 0 or 1/2 as the verifier's verdict on (i, j) is A, B or tie.

    Every other stage is unchanged, so a loop run with it measures what the rest of SRC can achieve with a
    perfect judge. It needs each prompt's ``scene`` and ``question_spec``; a prompt without them is an error.
    """
    truth = {r["id"]: r for r in prompts.select("id", "scene", "question_spec").iter_rows(named=True)}
    ids, matrices = [], []
    for pid, _, cands in _prompts_with_candidates(candidates, prompts):
        t = truth[pid]
        if t["scene"] is None or t["question_spec"] is None:
            raise ValueError(f"prompt {pid!r} has no scene: the verifier judge works only on the synthetic domain")
        quality = [response_quality(c, t["scene"], t["question_spec"], cfg.quality_weights) for c in cands]
        ids.append(pid)
        matrices.append(
            [
                [
                    0.5 if i == j else VERDICT_VALUE[verifier_verdict(qi, qj, cfg.tie_margin)]
                    for j, qj in enumerate(quality)
                ]
                for i, qi in enumerate(quality)
            ]
        )
    return ids, matrices


def judge_agreement(
    prompt_ids: list[str], q_matrices, candidates: pl.DataFrame, prompts: pl.DataFrame, cfg: JudgeConfig = JudgeConfig()
) -> dict:
    """How often the debiased judgement ``q_ij`` sides with the verifier on pairs the verifier does not call a tie.

    Returns the agreement (NaN when no prompt has a scene or no pair is clear), the number of clear pairs, and
    the agreement of the trivial judge that always prefers the correct answer (the bar a judge must clear).
    """
    truth = {r["id"]: r for r in prompts.select("id", "scene", "question_spec", "answer").iter_rows(named=True)}
    by_prompt = {pid: g.sort("candidate") for (pid,), g in candidates.group_by("prompt_id")}
    agree = answer_agree = clear = 0
    for pid, q in zip(prompt_ids, q_matrices):
        t, group = truth.get(pid), by_prompt.get(pid)
        if t is None or t["scene"] is None or group is None:
            continue
        scene, question = Scene.from_json(t["scene"]), Question.from_json(t["question_spec"])
        checked = [verify(x, scene, question) for x in group["text"].to_list()]
        quality = [_quality(v, cfg.quality_weights) for v in checked]
        correct = [v.correct for v in checked]
        for i, j in permutations(range(len(checked)), 2):
            verdict = verifier_verdict(quality[i], quality[j], cfg.tie_margin)
            if verdict == "tie":
                continue
            clear += 1
            agree += (q[i][j] > 0.5) == (verdict == "A")
            answer_agree += (correct[i] > correct[j]) if verdict == "A" else (correct[j] > correct[i])
    nan = float("nan")
    return {
        "judge_agreement": agree / clear if clear else nan,
        "clear_pairs": clear,
        "answer_only_agreement": answer_agree / clear if clear else nan,
    }


def response_quality(response: str, scene_json: str, question_json: str, weights=(2.0, 1.0, 2.0)) -> float:
    """The teacher's score of one response: weighted answer correctness, rationale factuality and consistency."""
    return _quality(verify(response, Scene.from_json(scene_json), Question.from_json(question_json)), weights)


def _quality(v, weights) -> float:
    return weights[0] * v.correct + weights[1] * v.factuality + weights[2] * v.consistency


def _other_answers(answer: str) -> list[str]:
    """Wrong answers of the same kind as ``answer``: another number, colour, position, or the other of yes/no."""
    for space in (NUMBER_WORDS[:6], COLORS, ("yes", "no"), tuple(f"{r} {c}" for r in ROWS for c in COLUMNS)):
        if answer in space:
            return [a for a in space if a != answer]
    return ["no"] if answer != "no" else ["yes"]


def perturbed_responses(gold: str, rng: random.Random) -> list[str]:
    """Contrasting versions of a gold response, the mistakes a policy makes:

    - a wrong final answer under the gold rationale (wrong and inconsistent);
    - one perceived object recoloured (a false claim);
    - a wrong conclusion sentence and answer that agree with each other (the rationale's reasoning goes wrong).
    """
    rationale, answer = gold.rsplit("Answer:", 1)
    answer = answer.strip()
    wrong = rng.choice(_other_answers(answer))
    sentences = rationale.split(". ")
    i = rng.randrange(max(len(sentences) - 1, 1))  # a perception sentence, not the conclusion
    colours = [c for c in COLORS if c in sentences[i].split()]
    recoloured = list(sentences)
    if colours:
        recoloured[i] = sentences[i].replace(colours[0], rng.choice([c for c in COLORS if c != colours[0]]), 1)
    out = [f"{rationale}Answer: {wrong}", ". ".join(recoloured) + f"Answer: {answer}"]
    conclusion = sentences[-1]
    if f" {answer}" in conclusion:
        out.append(". ".join([*sentences[:-1], conclusion.replace(f" {answer}", f" {wrong}")]) + f"Answer: {wrong}")
    elif answer in ("yes", "no") and (" is a " in conclusion or " is no " in conclusion):
        flipped = (
            conclusion.replace(" is a ", " is no ")
            if " is a " in conclusion
            else conclusion.replace(" is no ", " is a ")
        )
        out.append(". ".join([*sentences[:-1], flipped]) + f"Answer: {wrong}")
    return out


def contrast_judgements(
    rows: pl.DataFrame, tokenizer, cfg: JudgeConfig = JudgeConfig(), max_pairs: int | None = None, seed: int = 0
) -> pl.DataFrame:
    """A cheap, large judge-training corpus that needs no sampling: each row's gold response and its perturbed
    copies, every ordered pair of them labelled by the verifier. ``rows`` need ``response``, ``scene`` and
    ``question_spec`` (the ``sft`` split has them)."""
    rng = random.Random(seed)
    out = []
    for t in rows.filter(pl.col("scene").is_not_null() & pl.col("response").is_not_null()).iter_rows(named=True):
        texts = [t["response"], *perturbed_responses(t["response"], rng)]
        quality = [response_quality(x, t["scene"], t["question_spec"], cfg.quality_weights) for x in texts]
        for i, j in permutations(range(len(texts)), 2):
            verdict = verifier_verdict(quality[i], quality[j], cfg.tie_margin)
            out.append(
                {
                    "prompt": judge_prompt(
                        tokenizer, t["question"], t["reference"] or "", t["answer"], texts[i], texts[j], cfg.template
                    ),
                    "completion": verdict_completion(verdict),
                    "verdict": verdict,
                }
            )
    if max_pairs is not None and len(out) > max_pairs:
        out = random.Random(seed).sample(out, max_pairs)
    return pl.DataFrame(out, schema={"prompt": pl.String, "completion": pl.String, "verdict": pl.String})


def verifier_judgements(
    candidates: pl.DataFrame,
    prompts: pl.DataFrame,
    tokenizer,
    cfg: JudgeConfig = JudgeConfig(),
    max_pairs: int | None = None,
    seed: int = 0,
    contrast_pairs: bool = True,
) -> pl.DataFrame:
    """Judge training rows (prompt, completion = verdict) for ordered candidate pairs, labelled by the verifier.

    With ``contrast_pairs``, each prompt's gold response is also paired with perturbed copies of itself
    (``perturbed_responses``), both orders, labelled by the verifier like any pair: clean contrasts that teach
    a small judge what to compare far sooner than the policy's own candidates alone.
    """
    truth = {r["id"]: r for r in prompts.iter_rows(named=True)}
    rng = random.Random(seed)
    rows = []
    for (pid,), group in candidates.group_by("prompt_id", maintain_order=True):
        t = truth[pid]
        if t["scene"] is None:
            continue  # no verifier for this row: it needs judgements from elsewhere
        texts = group["text"].to_list()
        quality = [response_quality(x, t["scene"], t["question_spec"], cfg.quality_weights) for x in texts]
        pairs = list(permutations(range(len(texts)), 2))
        if contrast_pairs and t["response"]:
            n = len(texts)
            texts = texts + [t["response"], *perturbed_responses(t["response"], rng)]
            quality += [response_quality(x, t["scene"], t["question_spec"], cfg.quality_weights) for x in texts[n:]]
            pairs += [pair for m in range(n + 1, len(texts)) for pair in ((n, m), (m, n))]
        for i, j in pairs:
            verdict = verifier_verdict(quality[i], quality[j], cfg.tie_margin)
            rows.append(
                {
                    "prompt": judge_prompt(
                        tokenizer, t["question"], t["reference"] or "", t["answer"], texts[i], texts[j], cfg.template
                    ),
                    "completion": verdict_completion(verdict),
                    "verdict": verdict,
                }
            )
    if max_pairs is not None and len(rows) > max_pairs:
        rows = random.Random(seed).sample(rows, max_pairs)
    return pl.DataFrame(rows, schema={"prompt": pl.String, "completion": pl.String, "verdict": pl.String})


def user_judgements(table: pl.DataFrame, tokenizer, cfg: JudgeConfig = JudgeConfig()) -> pl.DataFrame:
    """Judge training rows from a user's judgement table (``source_data.validate_judgements``): each pair in both
    orders, the verdict swapped with the order, so the judge learns the judgement and not the position."""
    swap = {"A": "B", "B": "A", "tie": "tie"}
    rows = []
    for t in table.iter_rows(named=True):
        for first, second, verdict in (
            (t["response_a"], t["response_b"], t["verdict"]),
            (t["response_b"], t["response_a"], swap[t["verdict"]]),
        ):
            rows.append(
                {
                    "prompt": judge_prompt(
                        tokenizer, t["question"], t["reference"] or "", t["answer"], first, second, cfg.template
                    ),
                    "completion": verdict_completion(verdict),
                    "verdict": verdict,
                }
            )
    return pl.DataFrame(rows, schema={"prompt": pl.String, "completion": pl.String, "verdict": pl.String})


def train_r_scorer(base_model: str, judgements: pl.DataFrame, out_dir: str, settings, callbacks=()) -> dict:
    """Trains the judge on (prompt, completion = verdict) rows with TRL's SFTTrainer, loss on the verdict only."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from .models import load_scorer
    from .training import quiet, save_trained

    model, tokenizer = load_scorer(base_model, settings.weights_runtime())
    dataset = Dataset.from_dict(
        {"prompt": judgements["prompt"].to_list(), "completion": judgements["completion"].to_list()}
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(**settings.trl_kwargs(scratch), completion_only_loss=True)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=settings.peft_config(),
            callbacks=list(callbacks),
        )
        result = quiet(trainer, "R-Scorer training (steps)").train()
    save_trained(trainer, tokenizer, out_dir, "R-Scorer training", "scorer_learning_rate", result.training_loss)
    return {"train_loss": result.training_loss, "steps": result.global_step, "log": trainer.state.log_history}
