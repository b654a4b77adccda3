"""Stage 3: the judge, a text-only judge LM that compares two candidates of one prompt.

It reads the question, a reference (the image's reference description and the
ground-truth answer) and candidates A and B, and its verdict is read from the
next-token distribution over the verdict tokens {A, B, tie}:
``p(i first, j second) = P(A) + P(tie) / 2``, the three renormalised among
themselves. Only the last position's logits are computed (``logits_to_keep=1``).

Training labels come from the domain verifier (the teacher, as a large judge
model is in the paper), or from a user's table of judgements
(``judge_corpus.py``); the judge is trained with TRL's ``SFTTrainer`` on the
verdict token alone. Any pretrained instruction-tuned causal LM can be used
zero-shot instead, with the ``instruct`` prompt template.

A step judges through a ``Judge``: the verifier itself (the oracle bound,
``judge_model=verifier``) or a judge LM, loaded once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import permutations

import polars as pl
import torch

from kernels.pairwise import debias

from .generation import cache_rows, left_padded
from .progress import Progress, ProgressBar
from .setting import setting, validate_fields
from .verifier import (
    QUALITY_WEIGHTS,
    TIE_MARGIN,
    VERIFIER_JUDGE,
    candidates_per_prompt,
    judge_agreement,
    split_response,
    verifier_matrices,
    verifier_win_rate,
)

VERDICTS = ("A", "B", "tie")
JUDGE_TEMPLATES = ("compact", "instruct")
INSTRUCTION = (
    "You judge two responses to a question about an image you cannot see; the reference describes it. "
    "Prefer the response whose rationale states true facts about the image and whose final answer follows from "
    "its own rationale and is correct. Reply with one word: A, B, or tie."
)


@dataclass(frozen=True)
class JudgeConfig:
    template: str = setting(
        "compact",
        choices=JUDGE_TEMPLATES,
        name="judge_template",
        help="The judge's prompt: compact (the tiny judge) or instruct (a chat model used zero-shot).",
    )
    batch_size: int = setting(128, low=1, name="judge_batch_size", help="Pairs per judge forward pass.")
    # Verifier labels: quality = weighted correctness + factuality + consistency; gaps up to tie_margin are ties.
    quality_weights: tuple[float, float, float] = setting(
        QUALITY_WEIGHTS,
        name="judge_quality_weights",
        help="Weights of correctness, factuality and consistency in the verifier's quality of a response.",
    )
    tie_margin: float = setting(
        TIE_MARGIN, low=0, name="judge_tie_margin", help="Quality gaps up to this are ties in the verifier's labels."
    )

    def __post_init__(self):
        validate_fields(self)


def judge_prompt(tokenizer, prompt: Mapping, first: str, second: str, template: str = "compact") -> str:
    """The judge's prompt for candidates ``first`` (A) and ``second`` (B) of ``prompt`` (a row with ``question``, and
    ``reference`` and ``answer`` where known)."""
    question, reference, answer = prompt["question"], prompt.get("reference") or "", prompt.get("answer")
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


def batch_ranges(n: int, batch_size: int, breaks=()) -> list[tuple[int, int]]:
    """[start, end) batches of ``n`` items, ``batch_size`` at a time, each break starting a new batch."""
    edges = sorted({0, n, *(b for b in breaks if 0 < b < n)})
    return [
        (a, min(a + batch_size, end)) for start, end in zip(edges, edges[1:]) for a in range(start, end, batch_size)
    ]


@torch.no_grad()
def verdict_probabilities(
    model, tokenizer, prompts: list[str], batch_size: int = 128, progress: Progress = False, breaks=()
) -> torch.Tensor:
    """[prompts, 3]: P(A), P(B), P(tie) after each judge prompt, each verdict's whole token sequence scored and the
    three renormalised among themselves. No batch spans a break (an index where a batch must start)."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    bar = ProgressBar(len(prompts), "judging pairs", progress)
    for start, end in batch_ranges(len(prompts), batch_size, breaks):
        ids, tails = verdict_continuations(tokenizer, prompts[start:end])
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


def judge(
    model, tokenizer, prompts: list[str], batch_size: int = 128, progress: Progress = False, breaks=()
) -> torch.Tensor:
    """p(first beats second) for each judge prompt: ``P(A) + P(tie) / 2``."""
    probs = verdict_probabilities(model, tokenizer, prompts, batch_size, progress, breaks)
    return probs[:, 0] + probs[:, 2] / 2


@torch.no_grad()
def verdict_fit(model, tokenizer, judgements: pl.DataFrame, n: int = 256, seed: int = 0) -> dict:
    """How a judge reads back ``judgements`` (rows of ``prompt`` and ``verdict``, e.g. its own training rows), at most
    ``n`` of them drawn at random:

    - ``fit``: the share whose most probable verdict is the label;
    - ``prior_fit``: the share a judge that always says the commonest label gets; a judge whose ``fit`` is no better
      has learned the label prior and nothing that depends on what it reads;
    - ``verdict_spread``: the standard deviation of ``P(A) - P(B)`` across prompts (near 0: the same verdict for all);
    - ``mean_p_a``, ``mean_p_b``, ``mean_p_tie``: the mean verdict distribution.
    """
    rows = judgements.sample(n, seed=seed) if judgements.height > n else judgements
    if rows.is_empty():
        return {}
    probs = verdict_probabilities(model, tokenizer, rows["prompt"].to_list())
    predicted = [VERDICTS[i] for i in probs.argmax(1).tolist()]
    labels = rows["verdict"].to_list()
    counts = rows["verdict"].value_counts()["count"]
    return {
        "fit": sum(p == v for p, v in zip(predicted, labels)) / len(labels),
        "prior_fit": int(counts.max()) / len(labels),
        "verdict_spread": float((probs[:, 0] - probs[:, 1]).std()) if len(labels) > 1 else 0.0,
        **{f"mean_p_{v.lower()}": float(p) for v, p in zip(VERDICTS, probs.mean(0))},
    }


def pairwise_matrices(
    model,
    tokenizer,
    candidates: pl.DataFrame,
    prompts: pl.DataFrame,
    cfg: JudgeConfig = JudgeConfig(),
    progress: Progress = True,
    block: int = 0,
) -> tuple[list[str], list[list[list[float]]]]:
    """Every ordered pair of every prompt's candidates judged; returns prompt ids and K x K matrices (diagonal 0.5).
    With ``block``, no judge batch mixes two blocks of ``block`` prompts."""
    ids, matrices, texts, index, breaks = [], [], [], [], []
    for pid, row, cands in candidates_per_prompt(candidates, prompts):
        if block and len(ids) % block == 0:
            breaks.append(len(texts))
        ids.append(pid)
        matrices.append([[0.5] * len(cands) for _ in cands])
        for i, j in permutations(range(len(cands)), 2):
            texts.append(judge_prompt(tokenizer, row, cands[i], cands[j], cfg.template))
            index.append((len(ids) - 1, i, j))
    for (b, i, j), p in zip(index, judge(model, tokenizer, texts, cfg.batch_size, progress, breaks).tolist()):
        matrices[b][i][j] = p
    return ids, matrices


def independent_matrices(
    model,
    tokenizer,
    candidates: pl.DataFrame,
    prompts: pl.DataFrame,
    cfg: JudgeConfig = JudgeConfig(),
    progress: Progress = True,
    block: int = 0,
) -> tuple[list[str], list[list[list[float]]]]:
    """The ablation of pairwise judging: each candidate judged alone, against an empty response, in both orders.

    Its score ``s_i`` becomes a matrix ``p_ij = sigmoid(logit s_i - logit s_j)`` so that aggregation and curation
    run unchanged; only the judge's view differs (one candidate at a time instead of two side by side).
    """
    ids, texts, sizes, breaks = [], [], [], []
    for pid, row, cands in candidates_per_prompt(candidates, prompts):
        if block and len(ids) % block == 0:
            breaks.append(len(texts))
        ids.append(pid)
        sizes.append(len(cands))
        for c in cands:
            for first, second in ((c, ""), ("", c)):
                texts.append(judge_prompt(tokenizer, row, first, second, cfg.template))
    probs = judge(model, tokenizer, texts, cfg.batch_size, progress, breaks).view(-1, 2) if texts else torch.empty(0, 2)
    alone = debias(probs[:, 0], probs[:, 1]).clamp(1e-4, 1 - 1e-4)  # candidate first vs. empty, empty first vs. it
    logit = torch.log(alone) - torch.log1p(-alone)
    matrices, start = [], 0
    for k in sizes:
        l = logit[start : start + k]
        matrices.append(torch.sigmoid(l[:, None] - l[None, :]).fill_diagonal_(0.5).tolist() if k else [])
        start += k
    return ids, matrices


class Judge:
    """The judge one step uses, loaded once: the domain verifier (the oracle, ``judge_model=verifier``) or a judge
    LM with its tokenizer. Every stage that judges goes through it, so none compares judge kinds itself."""

    def __init__(self, cfg: JudgeConfig = JudgeConfig(), model=None, tokenizer=None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer

    @classmethod
    def load(cls, reference: str, runtime, cfg: JudgeConfig = JudgeConfig(), local_dir=lambda uri: uri) -> "Judge":
        """``reference``: ``"verifier"``, or a judge model (``local_dir`` turns a store URI into a directory)."""
        if is_oracle(reference):
            return cls(cfg)
        from .models import load_judge_model

        return cls(cfg, *load_judge_model(local_dir(reference), runtime))

    @property
    def is_oracle(self) -> bool:
        return self.model is None

    def matrices(
        self,
        candidates: pl.DataFrame,
        prompts: pl.DataFrame,
        scoring: str = "pairwise",
        progress: Progress = False,
        block: int = 0,
    ) -> tuple[list[str], list[list[list[float]]]]:
        """Each prompt's K x K matrix of ``p(i beats j)``: every ordered pair judged (``scoring="independent"``: each
        candidate alone, the ablation; the oracle always compares pairs). With ``block``, each judge batch holds
        prompts of one block of ``block`` only: batches shape the last bits of a score (padding, kernel tiling), so
        shards that cut between blocks then give the scores one shard gives."""
        if self.is_oracle:
            return verifier_matrices(candidates, prompts, self.cfg.quality_weights, self.cfg.tie_margin)
        judge_all = pairwise_matrices if scoring == "pairwise" else independent_matrices
        return judge_all(self.model, self.tokenizer, candidates, prompts, self.cfg, progress, block)

    def win_rate(self, prompts: pl.DataFrame, new: list[str], old: list[str], progress: Progress = False) -> float:
        """Mean debiased preference of ``new`` over ``old`` responses to the same prompts, both orders judged."""
        if self.is_oracle:
            return verifier_win_rate(prompts, new, old, self.cfg.quality_weights, self.cfg.tie_margin)
        if not new:
            return float("nan")
        rows = list(prompts.iter_rows(named=True))
        first = [judge_prompt(self.tokenizer, r, n, o, self.cfg.template) for r, n, o in zip(rows, new, old)]
        second = [judge_prompt(self.tokenizer, r, o, n, self.cfg.template) for r, n, o in zip(rows, new, old)]
        p_new_first = judge(self.model, self.tokenizer, first, self.cfg.batch_size, progress)
        p_old_first = judge(self.model, self.tokenizer, second, self.cfg.batch_size, progress)
        return float(debias(p_new_first, p_old_first).mean())

    def agreement(self, prompt_ids: list[str], q_matrices, candidates: pl.DataFrame, prompts: pl.DataFrame) -> dict:
        """How often this judge's debiased matrices side with the verifier on clear pairs, beside the bar of a judge
        that compares final answers only (``verifier.judge_agreement``)."""
        return judge_agreement(
            prompt_ids, q_matrices, candidates, prompts, self.cfg.quality_weights, self.cfg.tie_margin
        )


def is_oracle(reference: str) -> bool:
    """Whether a judge reference (``judge_model``, or the judge asset's value) names the verifier."""
    return reference == VERIFIER_JUDGE


def train_judge(base_model: str, judgements: pl.DataFrame, out_dir: str, settings, callbacks=()) -> dict:
    """Trains the judge on (prompt, completion = verdict) rows with TRL's SFTTrainer, loss on the verdict only."""
    from datasets import Dataset

    from .models import load_judge_model
    from .training import train

    dataset = Dataset.from_dict(
        {"prompt": judgements["prompt"].to_list(), "completion": judgements["completion"].to_list()}
    )
    return train(
        lambda runtime: load_judge_model(base_model, runtime),
        dataset,
        out_dir,
        settings,
        "judge training",
        "judge_learning_rate",
        callbacks=callbacks,
        completion_only_loss=True,
    )
