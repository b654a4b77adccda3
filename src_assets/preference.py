"""Stages 4-5: aggregate pairwise judgements and curate confidence-weighted preference pairs.

All aggregation goes through ``aggregate``: the Triton kernel on CUDA, the
PyTorch reference elsewhere (both in ``kernels.pairwise``, same math).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from kernels.pairwise import PairwiseAggregate, aggregate_pairwise, aggregate_pairwise_reference, pair_confidence

from .scenes import Question, Scene, gold_response
from .setting import setting, validate_fields
from .verifier import normalize_answer, verify

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class AggregationConfig:
    """Stage 4: from each prompt's judged matrix to per-candidate scores, and how pairs are ranked."""

    select_by: str = setting(
        "strength", choices=("strength", "win_rate"), help="Rank candidates by Bradley-Terry strength or win rate."
    )
    # 0 would leave every strength equal: chosen = rejected, nothing to train
    bt_iters: int = setting(50, low=1, help="Bradley-Terry iterations at most.")
    bt_tol: float = setting(1e-6, above=0, help="Bradley-Terry stops once strengths move less than this.")
    backend: str = setting(
        "auto",
        choices=BACKENDS,
        name="aggregation_backend",
        help="auto: the Triton kernel on CUDA, PyTorch elsewhere; or triton, or torch.",
    )

    def __post_init__(self):
        validate_fields(self)


@dataclass(frozen=True)
class CurationConfig:
    """Stage 5: which ranked pairs become training pairs."""

    tau: float = setting(0.1, low=0, high=1, help="Pairs whose confidence weight is below this are dropped.")
    pairs_per_prompt: int = setting(2, low=1, help="Pairs per prompt: best vs worst, 2nd best vs 2nd worst, and so on.")
    require_correct_chosen: bool = setting(True, help="Never keep a chosen response whose answer is wrong.")
    # Where the prompt has a scene (the verifier can tell), never keep a chosen response whose answer does not follow
    # from its rationale, or one with an untrue sentence: DPO would teach the answer apart from the rationale, or
    # teach the untrue sentence.
    require_consistent_chosen: bool = setting(
        True, help="Never keep a chosen response whose answer does not follow from its rationale (scenes only)."
    )
    require_factual_chosen: bool = setting(
        True, help="Never keep a chosen response with an untrue sentence about its scene (scenes only)."
    )

    def __post_init__(self):
        validate_fields(self)


def aggregate(
    p: torch.Tensor, valid: torch.Tensor | None, bt_iters=50, bt_tol=1e-6, backend="auto"
) -> PairwiseAggregate:
    """The one aggregation function of the pipeline."""
    if backend == "triton" or (backend == "auto" and p.is_cuda):
        return aggregate_pairwise(p, valid, bt_iters, bt_tol)
    return aggregate_pairwise_reference(p, valid, bt_iters, bt_tol)


def pad_matrices(matrices: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt K_b x K_b matrices -> p [B, K, K] and valid [B, K], K = max K_b."""
    K = max((len(m) for m in matrices), default=2)
    K = max(K, 2)
    p = torch.full((len(matrices), K, K), 0.5)
    valid = torch.zeros((len(matrices), K), dtype=torch.bool)
    for b, m in enumerate(matrices):
        if m:
            p[b, : len(m), : len(m)] = torch.tensor(m, dtype=torch.float32)
            valid[b, : len(m)] = True
    return p, valid


def score_table(
    prompt_ids: list[str], matrices: list[list[list[float]]], cfg: AggregationConfig = AggregationConfig()
) -> pl.DataFrame:
    """The ``pairwise_scores`` rows: each prompt's judged and debiased matrices and per-candidate scores."""
    p, valid = pad_matrices(matrices)
    device = "cuda" if cfg.backend != "torch" and torch.cuda.is_available() else "cpu"
    out = aggregate(p.to(device), valid.to(device), cfg.bt_iters, cfg.bt_tol, cfg.backend)
    out = PairwiseAggregate(*(t.cpu() for t in out))
    rows = []
    for b, pid in enumerate(prompt_ids):
        k = int(valid[b].sum())
        rows.append(
            {
                "prompt_id": pid,
                "n_candidates": k,
                "p": p[b, :k, :k].tolist(),
                "q": out.q[b, :k, :k].tolist(),
                "win_rate": out.win_rate[b, :k].tolist(),
                "strength": out.strength[b, :k].tolist(),
                "chosen": int(out.chosen[b]),
                "rejected": int(out.rejected[b]),
                "confidence": float(out.confidence[b]),
                "agreement": float(out.agreement[b]),
            }
        )
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


SCORE_SCHEMA = {
    "prompt_id": pl.String,
    "n_candidates": pl.Int64,
    "p": pl.List(pl.List(pl.Float64)),
    "q": pl.List(pl.List(pl.Float64)),
    "win_rate": pl.List(pl.Float64),
    "strength": pl.List(pl.Float64),
    "chosen": pl.Int64,
    "rejected": pl.Int64,
    "confidence": pl.Float64,
    "agreement": pl.Float64,
}


def _ranked_pairs(row: dict, cfg: CurationConfig, select_by: str) -> list[tuple[int, int, float]]:
    """(chosen, rejected, weight) for each pair of one prompt, best first by ``select_by``."""
    k = row["n_candidates"]
    if k < 2 or row["chosen"] < 0:
        return []
    if select_by == "strength" and cfg.pairs_per_prompt == 1:
        if row["chosen"] == row["rejected"]:
            return []
        return [(row["chosen"], row["rejected"], row["confidence"])]
    score = row[select_by]
    best_first = sorted(range(k), key=lambda i: (-score[i], i))
    worst_first = sorted(range(k), key=lambda i: (score[i], i))
    pairs = []
    for r in range(cfg.pairs_per_prompt):
        c, w = best_first[r], worst_first[r]
        if best_first.index(c) >= best_first.index(w) or score[c] == score[w]:
            break
        pairs.append((c, w, pair_confidence(row["p"][c][w], row["p"][w][c])))
    return pairs


def _unsound_chosen(text: str, prompt: dict, cfg: CurationConfig) -> str | None:
    """Why the verifier refuses ``text`` as a chosen response, where the prompt has a scene; else None."""
    if not (cfg.require_consistent_chosen or cfg.require_factual_chosen) or prompt.get("scene") is None:
        return None
    v = verify(text, Scene.from_json(prompt["scene"]), Question.from_json(prompt["question_spec"]))
    if cfg.require_consistent_chosen and not v.consistency:
        return "chosen answer does not follow from its rationale"
    if cfg.require_factual_chosen and v.factuality < 1:
        return "chosen response has an untrue sentence"
    return None


def _gold_response(prompt: dict) -> str | None:
    """The prompt's gold rationale response, where one is known (a scene, or the source's ``response``): what the
    gold-data bound (``policy_update=gold_sft``) trains on instead of the pairs."""
    if prompt.get("scene") is not None:
        return gold_response(Scene.from_json(prompt["scene"]), Question.from_json(prompt["question_spec"]))
    return prompt.get("response") or None


def curate_preferences(
    candidates: pl.DataFrame,
    scores: pl.DataFrame,
    prompts: pl.DataFrame,
    cfg: CurationConfig,
    select_by: str = "strength",
) -> pl.DataFrame:
    """The ``preference_set``: one row per pair considered, kept or dropped with the reason; pairs are ranked by
    the aggregation's ``select_by`` score.

    ``candidates``: prompt_id, candidate, text, answer. ``prompts``: id, question,
    answer (gold, may be null) and image.
    """
    by_prompt = {pid: group for (pid,), group in candidates.group_by("prompt_id")}
    prompt_rows = {r["id"]: r for r in prompts.iter_rows(named=True)}
    rows = []
    for s in scores.iter_rows(named=True):
        prompt = prompt_rows[s["prompt_id"]]
        group = by_prompt.get(s["prompt_id"])
        texts = dict(zip(group["candidate"], group["text"])) if group is not None else {}
        answers = dict(zip(group["candidate"], group["answer"])) if group is not None else {}
        base = {
            "prompt_id": s["prompt_id"],
            "question": prompt["question"],
            "image": prompt["image"],
            "gold_answer": prompt["answer"],
            "gold_response": _gold_response(prompt),
        }
        pairs = _ranked_pairs(s, cfg, select_by)
        if not pairs:
            reason = "fewer than 2 candidates" if s["n_candidates"] < 2 else "all candidates tied"
            rows.append(
                {
                    **base,
                    "chosen": None,
                    "rejected": None,
                    "chosen_answer": None,
                    "rejected_answer": None,
                    "chosen_correct": None,
                    "weight": 0.0,
                    "kept": False,
                    "drop_reason": reason,
                }
            )
            continue
        for c, r, weight in pairs:
            reason = None
            gold = prompt["answer"]
            correct = None if gold is None else normalize_answer(answers[c] or "") == normalize_answer(gold)
            if cfg.require_correct_chosen and correct is False:
                reason = f"chosen answer {answers[c]!r} is wrong (gold {gold!r})"
            else:
                reason = _unsound_chosen(texts[c], prompt, cfg)
            if reason is None and weight < cfg.tau:
                reason = f"weight {weight:.3f} below tau {cfg.tau}"
            rows.append(
                {
                    **base,
                    "chosen": texts[c],
                    "rejected": texts[r],
                    "chosen_answer": answers[c],
                    "rejected_answer": answers[r],
                    "chosen_correct": correct,
                    "weight": float(weight),
                    "kept": reason is None,
                    "drop_reason": reason,
                }
            )
    return pl.DataFrame(rows, schema=PREFERENCE_SCHEMA)


PREFERENCE_SCHEMA = {
    "prompt_id": pl.String,
    "question": pl.String,
    "image": pl.Binary,
    "gold_answer": pl.String,
    "gold_response": pl.String,  # null where neither a scene nor a source response gives it
    "chosen": pl.String,
    "rejected": pl.String,
    "chosen_answer": pl.String,
    "rejected_answer": pl.String,
    "chosen_correct": pl.Boolean,  # the chosen answer equals the gold one (normalize_answer); null without gold
    "weight": pl.Float64,
    "kept": pl.Boolean,
    "drop_reason": pl.String,
}
