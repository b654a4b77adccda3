"""Every saved policy's model card, written beside its stored version and rewritten as evaluations land.

A trained model directory carries ``training.json`` (what trained it; part of the version, so immutable). The card
(README.md, outside the version's manifest) renders that, the lineage's held-out metrics from the stored
evaluation tables, the source data and the run's settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from src_assets.config import TINY, SRCConfig
from src_assets.evaluation import summarize
from src_assets.model_card import model_card
from src_assets.storage import Store, StoreError

from .. import store_layout

TRAINING_REPORT = "training.json"


def write_training_report(model_dir: str, cfg: SRCConfig, iteration: int, started_from: str, **reported) -> None:
    """``training.json`` in a trained model directory, before it is stored."""
    base = cfg.policy_model if cfg.policy_model != TINY else f"tiny {cfg.tiny_policy_architecture} (built locally)"
    report = {"iteration": iteration, "base_model": base, "started_from": started_from, **reported}
    (Path(model_dir) / TRAINING_REPORT).write_text(json.dumps(report, indent=1, default=str))


def _eval_table(iteration: int) -> str:
    return (
        store_layout.asset_table("sft_eval")
        if iteration == 0
        else store_layout.asset_table("iteration_eval", f"{iteration:03d}")
    )


def lineage_metrics(store: Store, iteration: int) -> list[dict]:
    """The held-out metrics of iterations 0..``iteration`` that the store holds, each with its checkpoint."""
    rows = []
    for k in range(iteration + 1):
        key = _eval_table(k)
        if not store.exists(key):
            continue
        table = store.read_table(key).drop("image", strict=False)
        win = table["judge_win_rate_vs_previous"][0] if "judge_win_rate_vs_previous" in table.columns else None
        checkpoint = table["checkpoint"][0] if "checkpoint" in table.columns and table.height else None
        rows.append({"iteration": k, "checkpoint": checkpoint, **summarize(table), "judge_win_rate_vs_previous": win})
    return rows


def _data(store: Store, cfg: SRCConfig) -> dict:
    data = {"source": store.uri(cfg.source_prefix), "hub datasets": cfg.source_datasets or "none"}
    key = store_layout.asset_table("vqa_source")
    if store.exists(key):
        with store.open(key) as file:
            splits = pq.read_table(file, columns=["split"]).column("split").to_pylist()
        data["rows per split"] = {s: splits.count(s) for s in sorted(set(splits))}
    if cfg.n_sft or cfg.n_calibrate or cfg.n_eval:
        data["synthetic scenes"] = {"sft": cfg.n_sft, "calibrate": cfg.n_calibrate, "eval": cfg.n_eval}
    return data


def write_model_card(store: Store, uri: str, cfg: SRCConfig, name: str) -> None:
    """(Re)writes the card of the stored policy version ``uri`` from what the store holds now."""
    key = uri[len(store.base_uri) + 1 :]
    try:
        report = store.read_json(f"{key}/{TRAINING_REPORT}")
    except StoreError:
        report = {}
    report = dict(report) if isinstance(report, dict) else {}
    iteration = int(report.pop("iteration", 0))
    metrics = [m for m in lineage_metrics(store, iteration)]
    text = model_card(
        name,
        report.pop("base_model", cfg.policy_model),
        iteration,
        report.pop("started_from", "-"),
        report,
        _data(store, cfg),
        metrics,
        asdict(cfg),
    )
    store.write_model_card(uri, text)
