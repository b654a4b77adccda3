"""Turns tables and counts into metadata the Dagster UI renders."""

from __future__ import annotations

import json

import polars as pl
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from src_assets.base_stage import BASE_SCORES

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


def histogram_md(values: list[float], label: str, bins: int = 10) -> MetadataValue:
    """A text histogram over [0, 1] (weights, confidences), rendered as a Markdown table with bars."""
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1) if v == v else 0] += 1
    peak = max(counts) or 1
    rows = [
        f"| {i / bins:.1f}-{(i + 1) / bins:.1f} | {c} | {'#' * round(20 * c / peak)} |" for i, c in enumerate(counts)
    ]
    return MetadataValue.md(f"| {label} | pairs | |\n|---|---|---|\n" + "\n".join(rows))


def matrix_md(q: list[list[float]], win_rate: list[float], strength: list[float], texts: list[str]) -> MetadataValue:
    """One prompt's debiased pairwise matrix with each candidate's win rate, strength and text."""
    k = len(q)
    head = "| candidate | " + " | ".join(str(j) for j in range(k)) + " | win rate | strength | response |"
    sep = "|---" * (k + 4) + "|"
    rows = [
        f"| {i} | "
        + " | ".join("-" if i == j else f"{q[i][j]:.2f}" for j in range(k))
        + f" | {win_rate[i]:.2f} | {strength[i]:.2f} | {texts[i][:120].replace('|', '/').replace(chr(10), ' ')} |"
        for i in range(k)
    ]
    return MetadataValue.md("\n".join([head, sep, *rows]))


def metric_values(summary: dict) -> dict[str, float]:
    """The evaluation metrics that could be computed (a metric without a verifier is None and left out)."""
    from src_assets.evaluation import METRICS

    return {k: float(summary[k]) for k in METRICS if summary.get(k) is not None}


def anatomy_metadata(anatomy: dict) -> dict:
    """The anatomy (``evaluation.full_anatomy``) as a Markdown table per question kind, and its overall numbers as
    numeric metadata (``anatomy/...``) so the UI plots them across iterations."""
    from src_assets.evaluation import ANATOMY_ROWS

    rows = [*ANATOMY_ROWS, *(["any_correct_and_consistent_in_k"] if "k" in anatomy.get("all", {}) else [])]
    kinds = list(anatomy)
    cell = lambda v: "" if v is None else f"{v:.3f}"
    lines = ["| | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(cell(anatomy[k].get(r)) for k in kinds) + " |" for r in rows]
    lines.append("| n | " + " | ".join(str(anatomy[k].get("n", "")) for k in kinds) + " |")
    # accuracy and consistency are metadata of their own already
    overall = {
        f"anatomy/{r}": float(anatomy["all"][r])
        for r in rows
        if r not in ("accuracy", "consistency") and anatomy.get("all", {}).get(r) is not None
    }
    return {"anatomy": MetadataValue.md("\n".join(lines)), **overall}


def base_policy_metadata(found: dict, model_dir, parameters: int) -> dict:
    """The base policy's metadata: its held-out scores, its loss curve and the probe checks that stopped it."""
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "model": MetadataValue.text(found["uri"]),
        "trained": True,
        "architecture": ",".join(config.get("architectures") or ["?"]),
        "parameters": parameters,
        "train_loss": float(found["train_loss"]),
        "steps": int(found["steps"]),
        **{k: float(found[k]) for k in BASE_SCORES if found.get(k) is not None},
        "loss_curve": MetadataValue.md(
            "| step | loss |\n|---|---|\n" + "\n".join(f"| {st} | {l:.4f} |" for st, l in found["loss_curve"])
        ),
        "probe_exact_listing": MetadataValue.md(
            "| step | probe captions listing the scene exactly |\n|---|---|\n"
            + "\n".join(f"| {st} | {e:.2f} |" for st, e in found.get("probe_checks", []))
        ),
    }
