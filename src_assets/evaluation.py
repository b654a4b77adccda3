"""Stage 8: evaluation on the held-out set.

Answer accuracy, rationale factuality, completeness and rationale-answer
consistency come from the verifier on greedy responses. The judge's win rate
of policy k over policy k-1 is the debiased R-Scorer preference of the new
response over the old one on the same prompt, averaged.
"""

from __future__ import annotations

import io

import polars as pl
from PIL import Image

from kernels.pairwise import debias

from .generation import decode_image, generate_responses
from .progress import Progress
from .r_scorer import VERDICT_VALUE, JudgeConfig, judge, judge_prompt, response_quality, verifier_verdict
from .scenes import Question, Scene
from .verifier import normalize_answer, split_response, verify

METRICS = ("accuracy", "factuality", "completeness", "consistency")


def score_responses(eval_set: pl.DataFrame, responses: list[str]) -> pl.DataFrame:
    """One row per eval example: the response and the verifier's metrics.

    Rows without a scene get accuracy from the ``answer`` column and null for what only the verifier can tell."""
    rows = []
    for r, response in zip(eval_set.select("id", "kind", "scene", "question_spec", "answer").iter_rows(named=True), responses):
        stated = split_response(response)[1]
        m = {"accuracy": float(stated == normalize_answer(r["answer"] or "")), "factuality": None, "completeness": None,
             "consistency": None}
        if r["scene"] is not None:
            v = verify(response, Scene.from_json(r["scene"]), Question.from_json(r["question_spec"]))
            m = {"accuracy": v.correct, "factuality": v.factuality, "completeness": v.completeness, "consistency": v.consistency}
        rows.append({"id": r["id"], "kind": r["kind"], "response": response, **m})
    return pl.DataFrame(rows, schema={"id": pl.String, "kind": pl.String, "response": pl.String,
                                      **{k: pl.Float64 for k in METRICS}})


def summarize(scored: pl.DataFrame) -> dict[str, float | None]:
    """Each metric's mean over the rows that have it; None where no row has it (no verifier for these rows)."""
    out = {k: float(scored[k].mean()) if scored[k].null_count() < scored.height else None for k in METRICS}
    out["n"] = scored.height
    return out


def with_blank_images(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with every image replaced by a plain white one of the same size: what a policy that ignores
    its image scores the same on, and a policy that perceives does not."""
    blanks: dict[tuple[int, int], bytes] = {}
    out = []
    for data in rows["image"]:
        size = decode_image(data).size
        if size not in blanks:
            buf = io.BytesIO()
            Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
            blanks[size] = buf.getvalue()
        out.append(blanks[size])
    return rows.with_columns(pl.Series("image", out, dtype=pl.Binary))


def evaluate_policy(model, processor, eval_set: pl.DataFrame, max_new_tokens: int = 96,
                    progress: Progress = False) -> tuple[dict, pl.DataFrame]:
    responses = generate_responses(model, processor, eval_set["question"].to_list(), eval_set["image"].to_list(), max_new_tokens,
                                   progress=progress)
    scored = score_responses(eval_set, responses)
    return summarize(scored), scored


def judge_win_rate(scorer, tokenizer, eval_set: pl.DataFrame, new: list[str], old: list[str], cfg: JudgeConfig = JudgeConfig(),
                   progress: Progress = False) -> float:
    """Mean debiased judge preference of ``new`` over ``old`` responses, both orders judged."""
    if not new:
        return float("nan")
    rows = list(eval_set.select("question", "reference", "answer").iter_rows(named=True))
    first = [judge_prompt(tokenizer, r["question"], r["reference"] or "", r["answer"], n, o, cfg.template) for r, n, o in zip(rows, new, old)]
    second = [judge_prompt(tokenizer, r["question"], r["reference"] or "", r["answer"], o, n, cfg.template) for r, n, o in zip(rows, new, old)]
    p_new_first = judge(scorer, tokenizer, first, cfg.batch_size, progress)
    p_old_first = judge(scorer, tokenizer, second, cfg.batch_size, progress)
    return float(debias(p_new_first, p_old_first).mean())


def verifier_win_rate(eval_set: pl.DataFrame, new: list[str], old: list[str], cfg: JudgeConfig = JudgeConfig()) -> float:
    """The oracle judge's win rate of ``new`` over ``old``: 1, 0 or 1/2 per prompt as the verifier's verdict goes."""
    wins = [
        VERDICT_VALUE[verifier_verdict(response_quality(n, r["scene"], r["question_spec"], cfg.quality_weights),
                               response_quality(o, r["scene"], r["question_spec"], cfg.quality_weights), cfg.tie_margin)]
        for r, n, o in zip(eval_set.select("scene", "question_spec").iter_rows(named=True), new, old) if r["scene"] is not None
    ]
    return sum(wins) / len(wins) if wins else float("nan")
