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


def _settings(d: dict) -> TrainSettings:
    d = dict(d)
    d["runtime"] = Runtime(**d["runtime"])
    for name in ("report_to", "trainer_args", "lora_args"):
        d[name] = tuple(tuple(x) if isinstance(x, list) else x for x in d[name])
    return TrainSettings(**d)


def _run_spec(spec: dict, callbacks) -> dict:
    from dagster_project.assets.trained import TRAININGS  # the table the step itself trains with

    rows = pl.read_parquet(spec["rows"])
    return TRAININGS[spec["stage"]](
        spec["model"], rows, spec["out_dir"], _settings(spec["settings"]), callbacks, **spec["options"]
    )


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if int(os.environ.get("RANK", "0")) != 0:
        _run_spec(spec, ())
        return
    from dagster_pipes import open_dagster_pipes
    from transformers import TrainerCallback

    with open_dagster_pipes() as pipes:

        class PipesLog(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in (logs or {}).items()}
                pipes.log.info(f"{spec['stage']} step {state.global_step}/{state.max_steps}: {shown}")

        result = _run_spec(spec, (PipesLog(),))
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

    from .assets.trained import TRAININGS

    if stage not in TRAININGS:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {sorted(TRAININGS)}")
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
