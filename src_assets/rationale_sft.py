"""Stage 1: rationale fine-tuning data.

The SFT set teaches the model the response format: rationale sentences first,
then a final ``Answer: <answer>`` line, with no prompt asking for it.
"""

from __future__ import annotations

import tempfile

import polars as pl
from trl import SFTConfig, SFTTrainer

from .models import load_policy
from .source_data import SourceDataError
from .training import TrainSettings, quiet, save_trained, vision_dataset
from .verifier import normalize_answer, split_response


def build_rationale_sft_set(source: pl.DataFrame) -> pl.DataFrame:
    """The ``sft`` rows as (question, completion, image); each completion must end in its gold answer."""
    rows = source.filter(pl.col("split") == "sft")
    for row in rows.select("id", "response", "answer").iter_rows(named=True):
        rationale, answer = split_response(row["response"])
        if answer is None or not rationale.strip():
            raise SourceDataError(
                f"sft row {row['id']!r}: column 'response' is not in the rationale template "
                f"(rationale sentences, then 'Answer: ...'): {row['response'][:80]!r}"
            )
        if answer != normalize_answer(row["answer"]):
            raise SourceDataError(
                f"sft row {row['id']!r}: column 'response' answers {answer!r} but column 'answer' is {row['answer']!r}"
            )
    return rows.select("id", "kind", "question", pl.col("response").alias("completion"), "image")


def train_rationale_sft(base_model: str, sft_set: pl.DataFrame, out_dir: str, settings: TrainSettings, callbacks=()) -> dict:
    """Fine-tunes the policy on the rationale template with TRL's SFTTrainer; saves it to ``out_dir``.

    Loss is on the completion only (TRL's default for prompt-completion data). Returns the training metrics.
    """
    model, processor = load_policy(base_model, settings.weights_runtime())
    dataset = vision_dataset(sft_set, {"completion": "completion"})
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(**settings.trl_kwargs(scratch))
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                             peft_config=settings.peft_config(), callbacks=list(callbacks))
        result = quiet(trainer, "rationale SFT (steps)").train()
    save_trained(trainer, processor, out_dir)
    return {"train_loss": result.training_loss, "steps": result.global_step, "log": trainer.state.log_history}
