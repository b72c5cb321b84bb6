"""Named stages of a long task, each with a status line and its wall time (for the task's JSON)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console


class Stages:
    """`with stages("read source"): ...` prints `[i/n] name`, then a tick with the seconds.

    `spinner=True` shows a live spinner while the stage runs; stages that draw their own
    progress bars pass `spinner=False`, as two live displays would fight over the terminal.
    """

    def __init__(self, total: int, spinner: bool = True) -> None:
        self.console = Console(stderr=True)
        self.total, self.done, self.spinner = total, 0, spinner
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.done += 1
        label = f"[{self.done}/{self.total}] {name} ..."
        start = time.perf_counter()
        if not self.spinner:
            self.console.print(label)
        with self.console.status(label) if self.spinner else nullcontext():
            yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.console.print(f"[green]✓[/green] [{self.done}/{self.total}] {name} ({self.timings[name]:.1f}s)")
