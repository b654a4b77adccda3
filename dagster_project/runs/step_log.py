"""What ``src-calibrate`` prints while a run goes: one line per step as it finishes, not Dagster's event stream.

Each line names the step, its duration and the numbers its materialization recorded (pairs kept, accuracy,
train loss...); warnings and errors the steps log are printed as they come, and so is a step that waits for a
concurrency pool, with the runs that hold it. ``src-calibrate run -v`` shows Dagster's own event stream instead."""

import logging
import sys

from dagster import DagsterEventType, LoggerDefinition, logger

_SHOWN = 5  # numbers per line
_SKIPPED = {"stored_at", "tolerance", "reused", "trained"}


class _StepLines(logging.Handler):
    def __init__(self, stream, pool_holders=None):
        super().__init__()
        self.stream, self.numbers, self.pool_holders, self.waiting = stream, {}, pool_holders, set()

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event, step = meta.get("dagster_event"), meta.get("step_key")
        if event is None:
            message = meta.get("orig_message", record.getMessage())
            # Dagster's note on each step it skips after a failure ("Dependencies for step ... failed ... Not
            # executing.") repeats the failure that the run's last line names; -v shows them.
            if record.levelno >= logging.WARNING and not message.rstrip().endswith("Not executing."):
                print(f"  {record.levelname.lower()}: {step or ''} {message}", file=self.stream)
            return
        if event.event_type == DagsterEventType.ENGINE_EVENT and (event.message or "").startswith(
            "Step blocked by limit for pool"
        ):
            pool = event.message.rsplit(" ", 1)[-1]
            if (step, pool) not in self.waiting:  # Dagster repeats it while the step waits
                self.waiting.add((step, pool))
                holders = self.pool_holders(pool) if self.pool_holders else []
                held = f", held by run(s) {', '.join(r[:8] for r in holders)}" if holders else ""
                print(f"  {step}: waiting for pool {pool!r}{held}", file=self.stream)
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            values = event.event_specific_data.materialization.metadata
            numbers = {
                k: v.value
                for k, v in values.items()
                if k not in _SKIPPED and isinstance(v.value, (int, float)) and not isinstance(v.value, bool)
            }
            self.numbers[step] = dict(list(numbers.items())[:_SHOWN])
            reused = values.get("reused")
            if reused is not None and reused.value is True:
                self.numbers[step] = {"reused": None, **self.numbers[step]}  # said first, as a word
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            seconds = event.event_specific_data.duration_ms / 1000
            shown = "  ".join(
                k if v is None else f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in self.numbers.pop(step, {}).items()
            )
            print(f"  {step:<22} {seconds:7.1f} s  {shown}".rstrip(), file=self.stream)
        self.stream.flush()


def step_lines(instance=None) -> LoggerDefinition:
    """The logger: with ``instance``, a step waiting on a pool is printed with the runs that hold the pool."""

    def holders(pool: str) -> list[str]:
        return sorted(instance.event_log_storage.get_concurrency_info(pool).active_run_ids)

    @logger(description="One line per finished step (duration and key numbers); the steps' warnings, errors and waits.")
    def lines(init_context) -> logging.Logger:
        out = logging.Logger("src-calibrate", level=logging.DEBUG)
        out.addHandler(_StepLines(sys.stderr, holders if instance is not None else None))
        return out

    return lines
