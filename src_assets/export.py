"""A preference set in the ecosystem's shape: a Hugging Face dataset in TRL's preference columns.

``prompt``, ``chosen`` and ``rejected`` are conversational turns, ``images`` a list holding the prompt's image as
an ``Image`` feature, ``weight`` the pair's confidence; plain ``trl.DPOTrainer`` trains on it as it is (it ignores
``weight``), and ``WeightedDPOTrainer`` reads the weight too. ``prompt_id`` keeps each pair traceable.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from datasets import Dataset, Features, Image, List, Value

from .generation import user_turn

_TURN = List({"role": Value("string"), "content": Value("string")})
FEATURES = Features(
    {
        "prompt_id": Value("string"),
        "prompt": _TURN,
        "chosen": _TURN,
        "rejected": _TURN,
        "images": List(Image()),
        "weight": Value("float64"),
    }
)


def preference_dataset(preference_set: pl.DataFrame, kept_only: bool = True) -> Dataset:
    """The pairs of a ``preference_set`` table (its kept ones, by default) as a TRL preference dataset."""
    pairs = (
        preference_set.filter(pl.col("kept")) if kept_only else preference_set.filter(pl.col("chosen").is_not_null())
    )
    return Dataset.from_dict(
        {
            "prompt_id": pairs["prompt_id"].to_list(),
            "prompt": [user_turn(q) for q in pairs["question"]],
            "chosen": [[{"role": "assistant", "content": t}] for t in pairs["chosen"]],
            "rejected": [[{"role": "assistant", "content": t}] for t in pairs["rejected"]],
            "images": [[{"bytes": b, "path": None}] for b in pairs["image"]],
            "weight": pairs["weight"].cast(pl.Float64).to_list(),
        },
        features=FEATURES,
    )


def export_preference_set(preference_set: pl.DataFrame, out_dir: str | Path, kept_only: bool = True) -> Dataset:
    """Writes the dataset with ``save_to_disk`` (read back with ``datasets.load_from_disk``)."""
    dataset = preference_dataset(preference_set, kept_only)
    dataset.save_to_disk(str(out_dir))
    return dataset
