"""Stage 0, for the embedded default: the base policy, a tiny VLM pretrained on cheap synthetic perception.

SRC starts from a capable VLM, one that already sees. Its rationale fine-tuning is light (it changes the
response format), and calibration then aligns the answer with the rationale written before it. A tiny VLM
trained from scratch on rationales alone learns the format long before it learns to see, so the embedded
default first gives it what a real VLM brings from pretraining:

- **captions**: ``describe the image.`` answered by the scene listed in the rationale's own perception sentences
  (``there is a red square at the top left. ...``);
- **direct answers**: each question kind answered in one sentence about the asked subject and the ``Answer: ...``
  line, with no listing of the scene before it: the answer is read from the image directly.

A user's own hub model skips this stage: it is already capable.
"""

from __future__ import annotations

import random

import polars as pl

from .generation import generate_responses
from .progress import Progress
from .scenes import (
    CAPTION_QUESTION,
    QUESTION_KINDS,
    Scene,
    answer_question,
    conclusion_sentence,
    describe_scene,
    generate_examples,
)
from .training import TrainSettings, train_vision_sft
from .verifier import verify_caption

CAPTION_KIND = "caption"
PERCEPTION_SCHEMA = {
    "id": pl.String,
    "kind": pl.String,
    "question": pl.String,
    "completion": pl.String,
    "image": pl.Binary,
    "scene": pl.String,
    "question_spec": pl.String,
}


ANSWER_FORMS = ("sentence", "short")


def perception_corpus(
    n: int,
    seed: int,
    caption_share: float = 0.5,
    min_objects: int = 2,
    max_objects: int = 5,
    answer_form: str = "sentence",
) -> pl.DataFrame:
    """``n`` (question, completion, image) rows: a share ``caption_share`` of captions, the rest direct answers to
    the domain's questions (kinds in equal shares). Its scenes are drawn from their own stream (split ``base``),
    apart from the sft, calibrate and eval scenes. A direct answer is the answer line alone (``short``), or the
    sentence that states it about the question's subject, then the answer line (``sentence``)."""
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"answer_form must be one of {ANSWER_FORMS}, got {answer_form!r}")
    rng = random.Random(f"{seed}/base/caption")
    rows = []
    for e in generate_examples(n, seed, "base", QUESTION_KINDS, min_objects, max_objects):
        row = e.row()
        if rng.random() < caption_share:
            row.update(kind=CAPTION_KIND, question=CAPTION_QUESTION, completion=describe_scene(e.scene))
        else:
            answer = f"Answer: {answer_question(e.scene.objects, e.question)}"
            if (
                answer_form == "sentence"
            ):  # as a VLM answers briefly: one sentence about the asked subject, then the answer
                answer = f"{conclusion_sentence(e.scene.objects, e.question)}\n{answer}"
            row.update(completion=answer)
        rows.append(row)
    return pl.DataFrame([{k: r[k] for k in PERCEPTION_SCHEMA} for r in rows], schema=PERCEPTION_SCHEMA)


def probe_scenes(n: int, seed: int, min_objects: int = 2, max_objects: int = 5) -> pl.DataFrame:
    """Scenes of a stream of their own (split ``base-probe``) on which training watches the captions."""
    return pl.DataFrame(
        [e.row() for e in generate_examples(n, seed, "base-probe", QUESTION_KINDS, min_objects, max_objects)]
    )


class StopWhenPerceiving:
    """A trainer callback: every ``every`` steps the policy captions the probe scenes, and training stops once its
    captions list the scene exactly ``target`` of the time. The step at which a tiny VLM crosses from guessing to
    seeing varies from seed to seed (by hundreds of steps), so a fixed step count is either too short for some
    seeds or wasted on others. Each check is recorded in ``checks`` as (step, exact listing)."""

    def __init__(self, probe: pl.DataFrame, every: int, target: float):
        from transformers import TrainerCallback

        self.probe, self.every, self.target, self.checks = probe, every, target, []
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
                if state.global_step % outer.every:
                    return
                was_training = model.training
                summary, _ = evaluate_captions(model, processing_class, outer.probe)
                model.train(was_training)
                outer.checks.append((state.global_step, summary["exact_listing"]))
                if summary["exact_listing"] >= outer.target:
                    control.should_training_stop = True

        self.callback = _Callback()


def train_base_policy(
    model_dir: str,
    corpus: pl.DataFrame,
    out_dir: str,
    settings: TrainSettings,
    callbacks=(),
    stop: StopWhenPerceiving | None = None,
) -> dict:
    """The tiny VLM at ``model_dir`` pretrained on the perception corpus (TRL's ``SFTTrainer``) for at most
    ``settings.epochs``, or until ``stop`` sees it perceive; saved to ``out_dir``."""
    callbacks = [*callbacks, *([stop.callback] if stop else [])]
    result = train_vision_sft(model_dir, corpus, out_dir, settings, "base stage", callbacks, "base_learning_rate")
    return {**result, "probe_checks": stop.checks if stop else []}


def score_captions(rows: pl.DataFrame, captions: list[str]) -> pl.DataFrame:
    """One row per scene: the caption, its factuality and whether it lists the scene exactly."""
    out = []
    for r, caption in zip(rows.select("id", "scene").iter_rows(named=True), captions):
        factuality, exact = verify_caption(caption, Scene.from_json(r["scene"]))
        out.append({"id": r["id"], "caption": caption, "factuality": factuality, "exact_listing": float(exact)})
    return pl.DataFrame(
        out, schema={"id": pl.String, "caption": pl.String, "factuality": pl.Float64, "exact_listing": pl.Float64}
    )


def evaluate_captions(
    model, processor, rows: pl.DataFrame, max_new_tokens: int = 96, progress: Progress = False
) -> tuple[dict, pl.DataFrame]:
    """Greedy captions of ``rows``' images (which need a ``scene``), scored; returns the means and the table."""
    rows = rows.filter(pl.col("scene").is_not_null())
    captions = generate_responses(
        model, processor, [CAPTION_QUESTION] * rows.height, rows["image"].to_list(), max_new_tokens, progress=progress
    )
    scored = score_captions(rows, captions)
    summary = {k: float(scored[k].mean()) if scored.height else None for k in ("factuality", "exact_listing")}
    return {**summary, "n": scored.height}, scored


BASE_SCORES = ("caption_factuality", "caption_exact_listing", "direct_accuracy", "direct_accuracy_blank_images")


def pretrain_base_policy(
    init_dir: str,
    corpus: pl.DataFrame,
    out_dir: str,
    eval_set: pl.DataFrame,
    settings: TrainSettings,
    *,
    seed: int,
    min_objects: int,
    max_objects: int,
    check_every: int,
    stop_at_exact_listing: float,
    max_new_tokens: int,
    runtime,
    callbacks=(),
    progress: Progress = False,
) -> dict:
    """The base stage whole: the tiny VLM at ``init_dir`` pretrained on ``corpus`` into ``out_dir`` (stopping once
    100 probe scenes' captions list the scene exactly ``stop_at_exact_listing`` of the time; 0: never early), then
    scored on the held-out rows: its captions, and its direct answers with real and blank images (``BASE_SCORES``).
    Returns what training reported (loss curve, probe checks) with the scores."""
    from .evaluation import evaluate_policy, with_blank_images
    from .models import load_policy

    stop = None
    if stop_at_exact_listing > 0:
        stop = StopWhenPerceiving(probe_scenes(100, seed, min_objects, max_objects), check_every, stop_at_exact_listing)
    result = train_base_policy(init_dir, corpus, out_dir, settings, callbacks=callbacks, stop=stop)
    model, processor = load_policy(out_dir, runtime)
    captions, _ = evaluate_captions(model, processor, eval_set, max_new_tokens, progress=progress)
    direct, _ = evaluate_policy(model, processor, eval_set, max_new_tokens, progress=progress)
    blank, _ = evaluate_policy(model, processor, with_blank_images(eval_set), max_new_tokens)
    scores = (captions["factuality"], captions["exact_listing"], direct["accuracy"], blank["accuracy"])
    return {
        "train_loss": result["train_loss"],
        "steps": result["steps"],
        **dict(zip(BASE_SCORES, scores)),
        "loss_curve": [(h["step"], h["loss"]) for h in result["log"] if "loss" in h],
        "probe_checks": result["probe_checks"],
    }
