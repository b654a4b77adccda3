"""What ``src-calibrate`` prints while a run goes: one line per step as it finishes, not Dagster's event stream.

Each line names the step, its duration and the numbers its materialization recorded (pairs kept, accuracy,
train loss...); warnings and errors the steps log are printed as they come. ``src-calibrate run -v`` shows
Dagster's own event stream instead."""

import logging
import sys

from dagster import DagsterEventType, logger

_SHOWN = 5  # numbers per line
_SKIPPED = {"stored_at", "tolerance", "reused", "trained"}


class _StepLines(logging.Handler):
    def __init__(self, stream):
        super().__init__()
        self.stream, self.numbers = stream, {}

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event, step = meta.get("dagster_event"), meta.get("step_key")
        if event is None:
            if record.levelno >= logging.WARNING:
                print(f"  {record.levelname.lower()}: {step or ''} {meta.get('orig_message', record.getMessage())}",
                      file=self.stream)
            return
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            values = event.event_specific_data.materialization.metadata
            numbers = {k: v.value for k, v in values.items() if k not in _SKIPPED and isinstance(v.value, (int, float))
                       and not isinstance(v.value, bool)}
            self.numbers[step] = dict(list(numbers.items())[:_SHOWN])
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            seconds = event.event_specific_data.duration_ms / 1000
            shown = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.numbers.pop(step, {}).items())
            print(f"  {step:<22} {seconds:7.1f} s  {shown}".rstrip(), file=self.stream)
        self.stream.flush()


@logger(description="One line per finished step (duration and key numbers), and the steps' warnings and errors.")
def step_lines(init_context) -> logging.Logger:
    out = logging.Logger("src-calibrate", level=logging.DEBUG)
    out.addHandler(_StepLines(sys.stderr))
    return out
