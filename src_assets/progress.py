"""Progress of long loops (generation, judging): a tqdm bar on the terminal, and lines for a run log.

Stages take ``progress``: False shows nothing, True a tqdm bar on stderr, and a callable (such as a Dagster
log's ``info``) the bar plus one line every tenth of the way, so the UI's run log shows generation and
judging moving as it shows training."""

from __future__ import annotations

import time
from typing import Callable, Union

from tqdm.auto import tqdm

Progress = Union[bool, Callable[[str], None]]


class ProgressBar:
    def __init__(self, total: int, desc: str, progress: Progress = True):
        self.total, self.desc, self.done = total, desc, 0
        self.report = progress if callable(progress) else None
        self.bar = tqdm(
            total=total, desc=desc, disable=not progress, leave=False
        )  # a finished bar makes way for the next line
        self.start, self.next_tenth = time.monotonic(), 1

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.report and self.total and self.done * 10 >= self.next_tenth * self.total:
            self.report(f"{self.desc}: {self.done}/{self.total} after {time.monotonic() - self.start:.0f} s")
            while self.next_tenth * self.total <= self.done * 10:
                self.next_tenth += 1

    def close(self) -> None:
        self.bar.close()
