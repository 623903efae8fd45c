"""Progress reporting that passes use without knowing about the terminal.

The CLI installs :class:`RichProgress` on a terminal and :class:`LogProgress` otherwise (CI, logs,
pipes: plain lines with percentage, rate and ETA every few seconds); library use gets a silent
one by default. Every kind records what is running, so an interrupt can say what it stopped
(:func:`current_activity`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator

_activity = threading.local()


def current_activity() -> str | None:
    """The innermost running task's description (this thread), or None."""
    stack = getattr(_activity, "stack", None)
    return stack[-1] if stack else None


def interrupted_activity() -> str | None:
    """The innermost task an interrupt (KeyboardInterrupt, SIGTERM) unwound, once."""
    return _activity.__dict__.pop("interrupted", None)


@contextlib.contextmanager
def _running(description: str) -> Iterator[None]:
    stack = _activity.__dict__.setdefault("stack", [])
    stack.append(description)
    try:
        yield
    except KeyboardInterrupt:
        # The innermost task unwinds first; remember it for the interrupt message.
        _activity.__dict__.setdefault("interrupted", description)
        raise
    finally:
        stack.pop()


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
        with _running(description):
            yield Task(self)

    def log(self, message: str) -> None:  # noqa: D401 - silent by default
        pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LogTask(Task):
    """Counts steps; prints a status line at most every ``interval`` seconds."""

    def __init__(self, progress: "LogProgress", description: str, total: int | None):
        super().__init__(progress)
        self.description, self.total = description, total
        self.done = 0
        self.start = self.last = progress.clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self._progress.clock()
        if now - self.last >= self._progress.interval:
            self.last = now
            self._progress.log(self.status(now))

    def describe(self, text: str) -> None:
        self.description = text

    def status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        line = f"    {self.description}: {self.done}"
        if self.total:
            line += f"/{self.total} ({100 * self.done / self.total:.0f}%)"
        line += f", {rate:.2f}/s, elapsed {_clock(elapsed)}"
        if self.total and rate > 0:
            line += f", ETA {_clock(max(self.total - self.done, 0) / rate)}"
        return line


class LogProgress(Progress):
    """Plain lines on stderr for logs and CI, where bars would be noise: a line when a task
    starts, a status line (count, percentage, rate, ETA) every ``interval`` seconds while it
    advances, and a line when it ends."""

    def __init__(self, stream=None, interval: float = 5.0, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.clock = clock

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        of = f" ({total} steps)" if total else ""
        self.log(f"... {description}{of}")
        t = LogTask(self, description, total)
        with _running(description):
            yield t
        if t.done and self.clock() - t.start >= self.interval:
            self.log(f"    done: {t.description} in {_clock(self.clock() - t.start)}")

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
            with _running(description):
                yield Task(self, handle)
        finally:
            self._bar.remove_task(handle)
            self._depth -= 1
            if self._depth == 0:
                self._bar.stop()

    def log(self, message: str) -> None:
        self.console.print(message)
