"""Progress reporting that passes use without knowing about the terminal.

The CLI installs a rich-backed :class:`Progress`; library use gets a silent one by default.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class Task:
    def __init__(self, progress: "Progress", handle=None):
        self._progress = progress
        self._handle = handle

    def advance(self, n: int = 1) -> None:
        if self._handle is not None:
            self._progress._bar.advance(self._handle, n)

    def describe(self, text: str) -> None:
        if self._handle is not None:
            self._progress._bar.update(self._handle, description=text)


class Progress:
    """Silent progress (library default)."""

    _bar = None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield Task(self)

    def log(self, message: str) -> None:  # noqa: D401 - silent by default
        pass


class LogProgress(Progress):
    """One line per task on stderr (for logs and CI, where bars would be noise)."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stderr

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        print(f"... {description}", file=self.stream, flush=True)
        yield Task(self)

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


class RichProgress(Progress):
    """Progress bars on stderr (used by the CLI)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = Console(stderr=True)
        self._bar = RP(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                       transient=True)
        self._depth = 0

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        if self._depth == 0:
            self._bar.start()
        self._depth += 1
        handle = self._bar.add_task(description, total=total)
        try:
            yield Task(self, handle)
        finally:
            self._bar.remove_task(handle)
            self._depth -= 1
            if self._depth == 0:
                self._bar.stop()

    def log(self, message: str) -> None:
        self.console.print(message)
