"""Trained models: the one table of trainings (run in the step's process, or in processes of their own
through ``train_worker``), and reuse of a model trained earlier from the same inputs.
"""

from dataclasses import asdict
from pathlib import Path

import polars as pl

from src_assets.config import TINY
from src_assets.judge import train_judge
from src_assets.rationale_sft import train_rationale_sft
from src_assets.storage import StoreError, directory_digest
from src_assets.weighted_dpo import train_gold_bound, train_weighted_dpo

from .. import store_layout
from ..observe.training_log import DagsterLogCallback
from ..train_worker import run_training


def trained_before(context, store, key: str, fingerprint: str, cfg) -> dict | None:
    """The record (``uri`` and what the training reported) of the model a previous run trained from exactly these
    inputs, if the store still holds it intact. An unreadable record, or a model that fails its manifest check,
    counts as absent: the step trains again, and says why."""
    record = store_layout.trained_from(key, fingerprint)
    if not cfg.reuse_checkpoints or not store.exists(record):
        return None
    try:
        found = store.read_json(record)
        if not isinstance(found, dict) or not isinstance(found.get("uri"), str):
            raise StoreError(f"{store.uri(record)} names no model: {str(found)[:80]!r}")
        store.local_model_dir(found["uri"])
    except StoreError as e:
        context.log.warning(f"{key}: not reusing the model trained earlier from these inputs, training again: {e}")
        return None
    context.log.info(
        f"{key}: reusing {found['uri']}, trained earlier from the same inputs and settings "
        f"(reuse_checkpoints=false retrains)"
    )
    return found


TRAININGS = {
    "rationale_sft": lambda model, rows, out, settings, callbacks, **_: train_rationale_sft(
        model, rows, out, settings, callbacks
    ),
    "judge": lambda model, rows, out, settings, callbacks, **_: train_judge(model, rows, out, settings, callbacks),
    "weighted_dpo": lambda model, rows, out, settings, callbacks, **options: train_weighted_dpo(
        model, rows, out, settings, callbacks=callbacks, **options
    ),
    "gold_bound": lambda model, rows, out, settings, callbacks, **_: train_gold_bound(
        model, rows, out, settings, callbacks
    ),
}


def train(context, stage: str, model: str, rows: pl.DataFrame, out: str, settings, **options) -> dict:
    """A training here, or with ``train_processes`` > 1 in that many processes under ``accelerate launch`` (a
    Dagster Pipes subprocess that reports its log and metrics back to this step)."""
    if settings.processes > 1:
        return run_training(context, stage, model, rows, out, settings, **options)
    callbacks = [
        DagsterLogCallback(context.log, f"{stage} {context.partition_key if context.has_partition_key else ''}".strip())
    ]
    return TRAININGS[stage](model, rows, out, settings, callbacks, **options)


def remember_trained(store, key: str, fingerprint: str, uri: str, **reported) -> None:
    store.write_json(store_layout.trained_from(key, fingerprint), {"uri": uri, **reported})


def model_recipe(ref: str) -> dict:
    """What a model reference is: a directory of yours is its content (weights changed in place are a new
    model); a store version or a hub id is its reference."""
    return {"ref": ref, **({"content": directory_digest(ref)} if Path(ref).is_dir() else {})}


def tiny_recipe(cfg, architecture: str) -> dict:
    """A tiny model is rebuilt each run from its architecture, sizes and seed: those are what it is."""
    return {"ref": TINY, "tiny": asdict(cfg.tiny_spec()), "seed": cfg.seed, "architecture": architecture}
