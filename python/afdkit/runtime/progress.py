"""A progress bar for runs: rich or tqdm on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    """``update(done)`` with the number of finished steps; ``close()`` when over."""

    def __init__(self, label: str, total: int, quiet: bool = False) -> None:
        self.label, self.total, self.quiet = label, total, quiet
        self.done = 0
        self._bar: Any = None
        self._kind = "plain"
        if quiet or not sys.stdout.isatty():
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()
            self._kind = "rich"
            return
        except ImportError:
            pass
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="step", leave=False)
            self._kind = "tqdm"
        except ImportError:
            pass

    def update(self, done: int) -> None:
        if done <= self.done:
            return
        step, self.done = done - self.done, done
        if self.quiet:
            return
        if self._kind == "rich":
            self._bar.update(self._task, completed=done)
        elif self._kind == "tqdm":
            self._bar.update(step)
        elif done == self.total or self.total <= 20 or done % max(1, self.total // 10) == 0:
            print(f"{self.label}: step {done}/{self.total}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            (self._bar.stop if self._kind == "rich" else self._bar.close)()
            self._bar = None


__all__ = ["ProgressBar"]
