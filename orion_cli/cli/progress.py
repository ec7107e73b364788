"""Progress bars on stderr for the CLI; silent when stderr is not a terminal (CI logs, --json)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..progress import Advance


class RichProgress:
    """Draws one bar per stage on stderr; silent when stderr is not a terminal."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._enabled = self.console.is_terminal

    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None) -> Iterator[Advance]:
        if not self._enabled:
            yield lambda n=1: None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        if total is not None:
            columns.append(MofNCompleteColumn())
        columns.append(TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
            if total is not None:
                bar.update(task, completed=total)
