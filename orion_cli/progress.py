"""Progress reporting that library code can use without knowing about the CLI.

Library functions take a `progress` argument (default: silent): a reporter whose
stage() opens a named stage and yields a callback that advances it. The CLI
passes one that draws bars on a terminal (cli/progress.py); anything else that
implements stage() will do.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Protocol

Advance = Callable[[float], None]


class ProgressReporter(Protocol):
    def stage(self, description: str, total: float | None = None) -> contextlib.AbstractContextManager[Advance]:
        """A named stage; the yielded function advances it by n units of `total`."""


class NullProgress:
    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None) -> Iterator[Advance]:
        yield lambda n=1: None


NULL_PROGRESS = NullProgress()


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
