"""Turns tables and counts into metadata the Dagster UI renders."""

from __future__ import annotations

import polars as pl
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

_TYPES = {pl.Int64: "int", pl.Int32: "int", pl.Float64: "float", pl.Float32: "float", pl.Boolean: "bool"}


def table_preview(df: pl.DataFrame, n: int = 8, max_chars: int = 160) -> MetadataValue:
    """The first rows as a rendered table; binary columns (images) left out, long text cut."""
    cols = [c for c in df.columns if df.schema[c] != pl.Binary]
    head = df.head(n).select(cols)
    records = [
        TableRecord({k: (v[:max_chars] if isinstance(v, str) else v) for k, v in row.items()})
        for row in head.with_columns(
            [pl.col(c).cast(pl.String) for c in cols if df.schema[c] not in _TYPES and df.schema[c] != pl.String]
        ).iter_rows(named=True)
    ]
    schema = TableSchema(columns=[TableColumn(c, _TYPES.get(df.schema[c], "string")) for c in cols])
    return MetadataValue.table(records, schema=schema)


def counts_table(counts: dict[str, int], label: str) -> MetadataValue:
    total = sum(counts.values()) or 1
    return MetadataValue.md(
        f"| {label} | rows | share |\n|---|---|---|\n"
        + "\n".join(f"| {k} | {v} | {v / total:.0%} |" for k, v in counts.items())
    )


def vqa_table_metadata(df: pl.DataFrame) -> dict:
    kinds = dict(sorted(df.group_by("kind").len().iter_rows()))
    meta = {
        "rows": MetadataValue.int(df.height),
        "question_kinds": counts_table(kinds, "kind"),
        "preview": table_preview(df),
    }
    if "split" in df.columns:
        meta["splits"] = MetadataValue.json(dict(sorted(df.group_by("split").len().iter_rows())))
    return meta
