"""One training in ``train_processes`` processes: ``accelerate launch`` runs this module, as a Dagster Pipes
subprocess of the training's asset (``run_training``).

Every process runs the same training function of ``src_assets``; accelerate shards each global batch across
them (DDP, gloo on the CPU, NCCL on GPUs), and the first process saves the model. That process speaks Pipes: its
log lines reach the asset's Dagster log, and what the training reports comes back as a custom message that the
asset records as metadata.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import polars as pl

from src_assets.models import Runtime
from src_assets.training import TrainSettings

STAGES = ("rationale_sft", "judge", "weighted_dpo", "gold_bound")


def _settings(d: dict) -> TrainSettings:
    d = dict(d)
    d["runtime"] = Runtime(**d["runtime"])
    for name in ("report_to", "trainer_args", "lora_args"):
        d[name] = tuple(tuple(x) if isinstance(x, list) else x for x in d[name])
    return TrainSettings(**d)


def _train(spec: dict, callbacks) -> dict:
    rows = pl.read_parquet(spec["rows"])
    settings = _settings(spec["settings"])
    stage, model, out = spec["stage"], spec["model"], spec["out_dir"]
    if stage == "rationale_sft":
        from src_assets.rationale_sft import train_rationale_sft

        return train_rationale_sft(model, rows, out, settings, callbacks)
    if stage == "judge":
        from src_assets.judge import train_judge

        return train_judge(model, rows, out, settings, callbacks)
    if stage == "weighted_dpo":
        from src_assets.weighted_dpo import train_weighted_dpo

        return train_weighted_dpo(model, rows, out, settings, callbacks=callbacks, **spec["options"])
    from src_assets.weighted_dpo import train_gold_bound

    return train_gold_bound(model, rows, out, settings, callbacks)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if int(os.environ.get("RANK", "0")) != 0:
        _train(spec, ())
        return
    from dagster_pipes import open_dagster_pipes
    from transformers import TrainerCallback

    with open_dagster_pipes() as pipes:

        class PipesLog(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in (logs or {}).items()}
                pipes.log.info(f"{spec['stage']} step {state.global_step}/{state.max_steps}: {shown}")

        result = _train(spec, (PipesLog(),))
        result["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
        Path(spec["result"]).write_text(json.dumps(result, default=str))
        pipes.report_custom_message({k: v for k, v in result.items() if k != "log"})


def launch_command(processes: int, spec_path: str, device_type: str) -> tuple[list[str], dict]:
    """``accelerate launch`` for ``processes`` processes of this module; on the CPU through gloo."""
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"),
        *("-m", "dagster_project.train_worker", spec_path),
    ]
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "true"} if device_type == "cpu" else {})}
    return command, env


def run_training(context, stage: str, model: str, rows: pl.DataFrame, out_dir: str, settings: TrainSettings, **options):
    """Trains in ``settings``' process count under ``accelerate launch``, as a Pipes subprocess of ``context``'s
    step; returns what the training reported, as the in-process training functions do."""
    from dagster import PipesSubprocessClient

    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
    with tempfile.TemporaryDirectory() as scratch:
        spec = {
            "stage": stage,
            "model": model,
            "rows": str(Path(scratch) / "rows.parquet"),
            "out_dir": out_dir,
            "settings": asdict(settings),
            "options": options,
            "result": str(Path(scratch) / "result.json"),
        }
        rows.write_parquet(spec["rows"])
        Path(scratch, "spec.json").write_text(json.dumps(spec, default=str))
        command, env = launch_command(
            settings.processes, str(Path(scratch) / "spec.json"), settings.runtime.torch_device().type
        )
        context.log.info(f"{stage}: training in {settings.processes} processes: {' '.join(command)}")
        PipesSubprocessClient().run(command=command, context=context, env=env).get_custom_messages()
        return json.loads(Path(spec["result"]).read_text())


if __name__ == "__main__":
    main(sys.argv[1])
