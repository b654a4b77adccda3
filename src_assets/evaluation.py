"""Stage 8: evaluation on the held-out set.

Answer accuracy, rationale factuality, completeness and rationale-answer
consistency come from the verifier on greedy responses. The judge's win rate
of policy k over policy k-1 is the debiased R-Scorer preference of the new
response over the old one on the same prompt, averaged.
"""

from __future__ import annotations

import polars as pl

from .generation import generate_responses
from .r_scorer import JudgeConfig, judge, judge_prompt
from .scenes import Question, Scene
from .verifier import verify

METRICS = ("accuracy", "factuality", "completeness", "consistency")


def score_responses(eval_set: pl.DataFrame, responses: list[str]) -> pl.DataFrame:
    """One row per eval example: the response and the verifier's metrics (null where the row has no scene)."""
    rows = []
    for r, response in zip(eval_set.select("id", "kind", "scene", "question_spec").iter_rows(named=True), responses):
        m = {"accuracy": None, "factuality": None, "completeness": None, "consistency": None}
        if r["scene"] is not None:
            v = verify(response, Scene.from_json(r["scene"]), Question.from_json(r["question_spec"]))
            m = {"accuracy": v.correct, "factuality": v.factuality, "completeness": v.completeness, "consistency": v.consistency}
        rows.append({"id": r["id"], "kind": r["kind"], "response": response, **m})
    return pl.DataFrame(rows, schema={"id": pl.String, "kind": pl.String, "response": pl.String,
                                      **{k: pl.Float64 for k in METRICS}})


def summarize(scored: pl.DataFrame) -> dict[str, float]:
    out = {k: float(scored[k].mean()) if scored[k].null_count() < scored.height else float("nan") for k in METRICS}
    out["n"] = scored.height
    return out


def evaluate_policy(model, processor, eval_set: pl.DataFrame, max_new_tokens: int = 96) -> tuple[dict, pl.DataFrame]:
    responses = generate_responses(model, processor, eval_set["question"].to_list(), eval_set["image"].to_list(), max_new_tokens)
    scored = score_responses(eval_set, responses)
    return summarize(scored), scored


def judge_win_rate(scorer, tokenizer, eval_set: pl.DataFrame, new: list[str], old: list[str], cfg: JudgeConfig = JudgeConfig()) -> float:
    """Mean debiased judge preference of ``new`` over ``old`` responses, both orders judged."""
    if not new:
        return float("nan")
    rows = list(eval_set.select("question", "reference", "answer").iter_rows(named=True))
    first = [judge_prompt(tokenizer, r["question"], r["reference"] or "", r["answer"], n, o, cfg.template) for r, n, o in zip(rows, new, old)]
    second = [judge_prompt(tokenizer, r["question"], r["reference"] or "", r["answer"], o, n, cfg.template) for r, n, o in zip(rows, new, old)]
    p_new_first, p_old_first = judge(scorer, tokenizer, first, cfg.batch_size), judge(scorer, tokenizer, second, cfg.batch_size)
    return float(((p_new_first + 1 - p_old_first) / 2).mean())
