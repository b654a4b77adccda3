"""Stage 8: evaluation on the held-out set.

Answer accuracy, rationale factuality, completeness and rationale-answer
consistency come from the verifier on greedy responses; the anatomy of the
answers says where their errors come from. The judge's win rate of policy k
over policy k-1 is ``judge.Judge.win_rate``.
"""

from __future__ import annotations

import io

import polars as pl
import torch
from PIL import Image

from .generation import RESPONSE_TOKENS, decode_image, generate_responses
from .progress import Progress
from .scenes import Question, Scene
from .verifier import normalize_answer, split_response, verify

METRICS = ("accuracy", "factuality", "completeness", "consistency")
# Where a response's errors come from (verifier.Verification): the listing (perception), the steps and the
# conclusion (reasoning), the answer line (alignment).
ANATOMY = ("exact_listing", "steps_follow", "conclusion_follows_listing", "answer_is_conclusion")


def score_responses(eval_set: pl.DataFrame, responses: list[str]) -> pl.DataFrame:
    """One row per eval example: the response and the verifier's metrics.

    Rows without a scene get accuracy from the ``answer`` column and null for what only the verifier can tell."""
    rows = []
    for r, response in zip(
        eval_set.select("id", "kind", "scene", "question_spec", "answer").iter_rows(named=True), responses
    ):
        stated = split_response(response)[1]
        m = {
            "accuracy": float(stated == normalize_answer(r["answer"] or "")),
            "factuality": None,
            "completeness": None,
            "consistency": None,
            **{k: None for k in ANATOMY},
        }
        if r["scene"] is not None:
            v = verify(response, Scene.from_json(r["scene"]), Question.from_json(r["question_spec"]))
            m = {
                "accuracy": v.correct,
                "factuality": v.factuality,
                "completeness": v.completeness,
                "consistency": v.consistency,
                "exact_listing": float(v.exact_listing),
                "steps_follow": float(v.steps_follow),
                "conclusion_follows_listing": float(v.conclusion_follows_listing),
                "answer_is_conclusion": float(v.answer_is_conclusion),
            }
        rows.append({"id": r["id"], "kind": r["kind"], "response": response, **m})
    return pl.DataFrame(
        rows,
        schema={
            "id": pl.String,
            "kind": pl.String,
            "response": pl.String,
            **{k: pl.Float64 for k in (*METRICS, *ANATOMY)},
        },
    )


def summarize(scored: pl.DataFrame) -> dict[str, float | None]:
    """Each metric's mean over the rows that have it; None where no row has it (no verifier for these rows)."""
    out = {k: float(scored[k].mean()) if scored[k].null_count() < scored.height else None for k in METRICS}
    out["n"] = scored.height
    return out


ANATOMY_ROWS = (
    "accuracy",
    "exact_listing",
    "steps_follow",
    "conclusion_follows_listing",
    "answer_is_conclusion",
    "consistency",
    "wrong_with_exact_listing",
    "wrong_with_wrong_listing",
)


def anatomy(scored: pl.DataFrame) -> dict[str, dict[str, float | None]]:
    """The anatomy of a set of scored responses (``score_responses``), over all rows and per question kind: how
    often the listing is exact, every reasoning step follows, the conclusion follows from the listing, the answer line is the conclusion, and how the
    wrong answers split between exact and wrong listings (shares of all rows). Only rows with a scene count."""
    rows = scored.filter(pl.col("exact_listing").is_not_null())
    groups = {"all": rows, **{k: g for (k,), g in sorted(rows.group_by("kind"), key=lambda kv: kv[0])}}
    out = {}
    for name, g in groups.items():
        wrong = g["accuracy"] < 1
        out[name] = (
            {
                **{k: float(g[k].mean()) for k in ("accuracy", *ANATOMY, "consistency")},
                "wrong_with_exact_listing": float((wrong & (g["exact_listing"] == 1)).mean()),
                "wrong_with_wrong_listing": float((wrong & (g["exact_listing"] < 1)).mean()),
                "n": g.height,
            }
            if g.height
            else {"n": 0}
        )
    return out


def any_correct_and_consistent(eval_set: pl.DataFrame, samples: list[list[str]]) -> dict[str, float]:
    """The share of prompts, over all and per kind, with at least one correct and consistent response among their
    samples: the headroom a calibration of the policy's own candidates can reach."""
    hits: dict[str, list[bool]] = {"all": []}
    for r, group in zip(eval_set.select("kind", "scene", "question_spec").iter_rows(named=True), samples):
        if r["scene"] is None:
            continue
        scene, question = Scene.from_json(r["scene"]), Question.from_json(r["question_spec"])
        hit = any(v.correct and v.consistency for v in (verify(x, scene, question) for x in group))
        hits["all"].append(hit)
        hits.setdefault(r["kind"], []).append(hit)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items()) if v}


@torch.no_grad()
def sample_responses(
    model,
    processor,
    rows: pl.DataFrame,
    k: int,
    temperature: float = 1.0,
    max_new_tokens: int = RESPONSE_TOKENS,
    seed: int = 0,
    progress: Progress = False,
) -> list[list[str]]:
    """``k`` sampled responses per row (for ``any_correct_and_consistent``)."""
    torch.manual_seed(seed)
    questions = [q for q in rows["question"].to_list() for _ in range(k)]
    images = [im for im in rows["image"].to_list() for _ in range(k)]
    flat = generate_responses(
        model, processor, questions, images, max_new_tokens, do_sample=True, temperature=temperature, progress=progress
    )
    return [flat[i * k : (i + 1) * k] for i in range(rows.height)]


def full_anatomy(
    model,
    processor,
    eval_set: pl.DataFrame,
    scored: pl.DataFrame,
    samples: int,
    temperature: float = 1.0,
    max_new_tokens: int = RESPONSE_TOKENS,
    seed: int = 0,
    progress: Progress = False,
) -> dict:
    """``anatomy(scored)`` plus, with ``samples`` > 0, the share of prompts with a correct and consistent response
    among that many samples at ``temperature`` (``any_correct_and_consistent_in_k``)."""
    out = anatomy(scored)
    if samples > 0 and out["all"].get("n"):
        groups = sample_responses(model, processor, eval_set, samples, temperature, max_new_tokens, seed, progress)
        for kind, share in any_correct_and_consistent(eval_set, groups).items():
            out.setdefault(kind, {})["any_correct_and_consistent_in_k"] = share
        out["all"]["k"] = samples
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


def evaluate_policy(
    model, processor, eval_set: pl.DataFrame, max_new_tokens: int = RESPONSE_TOKENS, progress: Progress = False
) -> tuple[dict, pl.DataFrame]:
    responses = generate_responses(
        model, processor, eval_set["question"].to_list(), eval_set["image"].to_list(), max_new_tokens, progress=progress
    )
    scored = score_responses(eval_set, responses)
    return summarize(scored), scored


def preference_quality(prefs: pl.DataFrame, prompts: pl.DataFrame) -> dict[str, float]:
    """Of the kept pairs whose prompt has a scene: the share of chosen responses that are correct, consistent and
    fully factual (every perception sentence true), and the same of rejected ones; what DPO will pull towards and push from."""
    truth = {r["id"]: r for r in prompts.select("id", "scene", "question_spec").iter_rows(named=True)}
    counts = {f"{side}_{m}": 0 for side in ("chosen", "rejected") for m in ("correct", "consistent", "fully_factual")}
    n = 0
    for r in prefs.filter("kept").select("prompt_id", "chosen", "rejected").iter_rows(named=True):
        t = truth.get(r["prompt_id"])
        if t is None or t["scene"] is None:
            continue
        n += 1
        scene, question = Scene.from_json(t["scene"]), Question.from_json(t["question_spec"])
        for side in ("chosen", "rejected"):
            v = verify(r[side], scene, question)
            counts[f"{side}_correct"] += v.correct
            counts[f"{side}_consistent"] += v.consistency
            counts[f"{side}_fully_factual"] += v.factuality == 1.0
    return {k: v / n for k, v in counts.items()} if n else {}
