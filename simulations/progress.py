"""A progress bar on the terminal for long runs and sweeps.

The runner and the sweep take a plain callback ``progress(done, total)``
(simulated milliseconds for a run, runs for a sweep); this module renders it
with ``rich.progress`` on stderr. The bar appears only once the work has
taken more than ``delay_s`` of wall time (short runs stay quiet) and only
when stderr is a terminal, unless forced either way. Nothing a run computes
depends on it: the callback only reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Callback = Callable[[int, int], None]


class Bar:
    """Renders ``(done, total)`` updates as one rich progress bar, started
    lazily after ``delay_s``; ``scale`` divides the numbers shown (1000:
    milliseconds shown as seconds)."""

    def __init__(
        self,
        description: str,
        console: Console,
        *,
        unit: str = "s simulated",
        scale: float = 1_000.0,
        delay_s: float = 1.0,
    ) -> None:
        self.description = description
        self.console = console
        self.unit = unit
        self.scale = scale
        self.delay_s = delay_s
        self._began = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            if time.monotonic() - self._began < self.delay_s:
                return
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn(f"{{task.completed:,.0f}} / {{task.total:,.0f}} {self.unit}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total / self.scale)
        assert self._task is not None
        self._progress.update(self._task, completed=done / self.scale, total=total / self.scale)

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextmanager
def terminal_bar(
    description: str,
    *,
    force: bool | None = None,
    unit: str = "s simulated",
    scale: float = 1_000.0,
    delay_s: float = 1.0,
    file: TextIO | None = None,
) -> Iterator[Bar | None]:
    """A :class:`Bar` on stderr (or ``file``) if it should be shown: ``force``
    True or False decides; None means only when the output is a terminal.
    Yields None when no bar is to be shown (pass that on as ``progress``)."""
    console = Console(file=file, stderr=file is None, force_terminal=force or None)
    if force is False or (force is None and not console.is_terminal):
        yield None
        return
    bar = Bar(description, console, unit=unit, scale=scale, delay_s=delay_s)
    try:
        yield bar
    finally:
        bar.close()
