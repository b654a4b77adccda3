"""Stage 1: rationale fine-tuning data.

The SFT set teaches the model the response format: rationale sentences first,
then a final ``Answer: <answer>`` line, with no prompt asking for it.
"""

from __future__ import annotations

import polars as pl

from .source_data import SourceDataError
from .training import TrainSettings, train_vision_sft
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


def train_rationale_sft(
    base_model: str, sft_set: pl.DataFrame, out_dir: str, settings: TrainSettings, callbacks=()
) -> dict:
    """Fine-tunes the policy on the rationale template (``training.train_vision_sft``); saves it to ``out_dir``.
    From a base policy that already perceives, this is light work: it changes the response format."""
    return train_vision_sft(base_model, sft_set, out_dir, settings, "rationale SFT", callbacks, "sft_learning_rate")
