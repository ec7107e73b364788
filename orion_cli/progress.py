"""Progress reporting that library code can use without knowing about the CLI.

Library functions take a `progress` argument (default: silent). The CLI passes
a rich-backed reporter that draws on stderr, and only when stderr is a terminal,
so logs in CI and JSON on stdout stay clean.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

Advance = Callable[[float], None]


class ProgressReporter(Protocol):
    def stage(self, description: str, total: float | None = None) -> contextlib.AbstractContextManager[Advance]:
        """A named stage; the yielded function advances it by n units of `total`."""


class NullProgress:
    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None) -> Iterator[Advance]:
        yield lambda n=1: None


NULL_PROGRESS = NullProgress()


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


class Stopwatch:
    """Durations of named stages, for metadata.json."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = round(time.perf_counter() - start, 3)
