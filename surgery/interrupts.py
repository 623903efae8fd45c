"""SIGINT and SIGTERM during a command: unwind like Ctrl-C, so every temporary output is removed
by its context manager (surgery/atomic.py), then exit 130 or 143 saying what was interrupted."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from surgery import progress


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so the same cleanup runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` (SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def exit_code(e: BaseException) -> int:
    """128 + the signal number, as shells report a process killed by it."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


def describe(e: BaseException) -> str:
    name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
    doing = progress.interrupted_activity() or progress.current_activity()
    where = f" while {doing}" if doing else ""
    from surgery import atomic

    done = [str(p) for p in atomic.published]
    if done:  # a signal held back during a publish step lands after it
        return (f"interrupted by {name}{where}; already written: {', '.join(done)}; nothing else "
                "was written, and temporary files were removed")
    return (f"interrupted by {name}{where}; no output was written or replaced, and temporary "
            "files were removed")
