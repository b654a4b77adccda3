"""Trackers: where each training's logs go, and the pipeline's own per-iteration metrics.

With ``report_to`` set (``tensorboard``, ``mlflow``, ``wandb``: transformers' integrations), each training logs
under ``<logging_dir>/<asset>[/<iteration>]`` and the pipeline's metrics (accuracy, factuality, consistency,
judge agreement, pairs kept, mean weight) under ``<logging_dir>/pipeline``, one step per iteration (0 is the SFT
checkpoint), beside the same numbers in Dagster's metadata.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from src_assets.config import SRCConfig
from src_assets.storage import Store
from src_assets.training import TrainSettings


def logging_root(cfg: SRCConfig, store: Store) -> Path:
    """``logging_dir``, or a ``logs/`` folder beside a local store (``./logs`` for a remote one)."""
    if cfg.logging_dir:
        return Path(cfg.logging_dir).expanduser()
    return Path(store.root).parent / "logs" if store.is_local else Path("logs").resolve()


def tracked(settings: TrainSettings, cfg: SRCConfig, store: Store, asset: str, partition: str | None = None):
    """A training's settings with its trackers' directory and run name."""
    name = f"{asset}/{partition}" if partition else asset
    return replace(settings, log_dir=str(logging_root(cfg, store) / name), run_name=name)


def _trackers(cfg: SRCConfig) -> set[str]:
    return {t.strip() for t in cfg.report_to.split(",") if t.strip()} - {"none"}


def log_pipeline_metrics(cfg: SRCConfig, store: Store, step: int, metrics: dict, log=None) -> None:
    """``metrics`` (name -> number; None and NaN are skipped) at ``step`` (the iteration) to every tracker of
    ``report_to``. A tracker that is not installed is skipped with a warning: the numbers are in Dagster too."""
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    trackers = _trackers(cfg)
    if not values or not trackers:
        return
    if trackers & {"tensorboard", "all"}:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(logging_root(cfg, store) / "pipeline")) as writer:
            for name, value in values.items():
                writer.add_scalar(f"pipeline/{name}", value, step)
    if trackers & {"mlflow", "all"}:
        try:
            import mlflow
        except ImportError:
            log and log.warning("report_to names mlflow, which is not installed: pipeline metrics not sent")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "src-calibration")
            mlflow.set_experiment(experiment)
            with mlflow.start_run(run_name="pipeline"):
                mlflow.log_metrics({f"pipeline/{k}": v for k, v in values.items()}, step=step)
    if trackers & {"wandb", "all"}:
        try:
            import wandb
        except ImportError:
            log and log.warning("report_to names wandb, which is not installed: pipeline metrics not sent")
        else:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "src-calibration"), name="pipeline", reinit=True)
            run.log({f"pipeline/{k}": v for k, v in values.items()}, step=step)
            run.finish()
