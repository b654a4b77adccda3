"""Hugging Face ``datasets`` as sources: a ``save_to_disk`` folder, or a hub dataset from the local cache."""

from __future__ import annotations

import polars as pl

from .source_data import (
    SPLITS,
    SourceDataError,
    SourceOptions,
    combine_sources,
    no_image_files,
    read_chunks,
)


def read_dataset_source(dataset, name: str, options: SourceOptions) -> pl.DataFrame:
    """A ``datasets.Dataset`` or ``DatasetDict`` (from ``load_from_disk`` or ``load_dataset``), read as Arrow
    batches of ``options.batch_rows`` rows from its memory-mapped files. A ``DatasetDict``'s split names become
    the rows' ``split`` where they have none: ``sft``, ``calibrate`` or ``eval``, or any name with
    ``split_fractions`` set."""
    from datasets import DatasetDict

    parts = {None: dataset} if not isinstance(dataset, DatasetDict) else dict(dataset)
    frames = []
    for split, part in parts.items():
        where = name if split is None else f"{name} (split {split!r})"
        has_split = "split" in options.columns or "split" in part.column_names
        if split is not None and not has_split and not options.split_fractions and split not in SPLITS:
            raise SourceDataError(
                f"{where}: the dataset's split {split!r} is none of {SPLITS} and its rows have no 'split' column; "
                f"rename the split, or set split_fractions=sft:0.5,calibrate:0.4,eval:0.1"
            )
        own = split if split in SPLITS else None
        chunks = (pl.from_arrow(b) for b in part.with_format("arrow").iter(batch_size=options.batch_rows))
        frames.append((where, read_chunks(chunks, where, options, no_image_files, split=own)))
    return combine_sources(frames)
