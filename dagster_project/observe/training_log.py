"""Trainer progress into the Dagster run log."""

from transformers import TrainerCallback


class DagsterLogCallback(TrainerCallback):
    """Logs each trainer log line (loss, learning rate, rewards...) to the run's log, prefixed with the stage."""

    def __init__(self, log, stage: str):
        self.log, self.stage = log, stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            self.log.info(f"{self.stage} step {state.global_step}/{state.max_steps}: {shown}")
