"""Write outputs so that the output path holds the old artifact or the complete new one at every
instant, even if the process is killed.

A new artifact is written into ``.NAME.tmp-PID-XXXX`` beside the output, then published:

- a fresh path: one ``rename``;
- a replaced file: one ``rename`` over it (atomic on POSIX);
- a replaced directory: on Linux, one ``renameat2(RENAME_EXCHANGE)`` swaps the two directories
  atomically, and the old artifact (now under the temporary name) is deleted. Where the exchange
  is unavailable (other systems, some filesystems) the fallback is two renames, final -> ``.NAME.old-*``
  then tmp -> final. A kill between them leaves no final path for a moment; the next write to the
  same output (:func:`recover`) puts the ``.old-*`` directory back first.

Writers of one output take an exclusive lock (``flock`` on ``.NAME.lock``, removed when released), so
two concurrent runs never interleave; the second gets E0804. Under the lock, ``.NAME.tmp-*`` and
``.NAME.old-*`` entries left by killed runs are removed (or restored) and reported.

SIGINT and SIGTERM are held back during the publish step so that it completes or never starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2  # linux/fs.h
# Tests widen the publish window to kill a run inside it (seconds, read at each publish).
PAUSE_ENV = "SURGERY_TEST_SWAP_PAUSE"
# Forces the two-rename fallback (tests of recovery; filesystems without RENAME_EXCHANGE).
NO_EXCHANGE_ENV = "SURGERY_NO_RENAME_EXCHANGE"

# Notes about recovered or removed leftovers, for the caller to report (see take_notes).
_notes: list[str] = []
_held: dict[Path, "OutputLock"] = {}
_held_guard = threading.Lock()
published: list[Path] = []  # outputs this process has put in place (an interrupt report names them)


def take_notes() -> list[str]:
    """Messages about leftovers cleaned up since the last call."""
    out = list(_notes)
    _notes.clear()
    return out


def _note(message: str) -> None:
    log.info(message)
    _notes.append(message)


# ---------------------------------------------------------------------------- locking

class OutputLocked(Exception):
    def __init__(self, path: Path, holder: str):
        super().__init__(f"`{path}` is being written by another surgery process ({holder})")
        self.path, self.holder = path, holder


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock``; the file is removed on release."""

    def __init__(self, final: Path):
        self.final = final
        self.path = lock_path(final)
        self.fd: int | None = None
        self.count = 0

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = "pid " + (os.pread(fd, 32, 0).decode(errors="replace").strip() or "?")
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputLocked(self.final, holder) from None
                raise
            # The holder before us may have removed the file after we opened it: then our lock
            # is on an orphan inode, and we try again on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def claim(path: str | os.PathLike) -> Path:
    """Lock ``path`` for this process (re-entrant) and clean up what killed writers left. Raises
    OutputLocked when another process holds it. Returns the resolved path."""
    final = Path(path).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        lock = _held.get(final)
        if lock is None:
            lock = OutputLock(final)
            lock.acquire()
            _held[final] = lock
        lock.count += 1
    recover(final)
    return final


def release(path: str | os.PathLike) -> None:
    final = Path(path).resolve()
    with _held_guard:
        lock = _held.get(final)
        if lock is None:
            return
        lock.count -= 1
        if lock.count <= 0:
            lock.release()
            del _held[final]


def release_all() -> None:
    """Drop every lock this process holds (the CLI calls this on exit; the OS would anyway)."""
    with _held_guard:
        for lock in _held.values():
            lock.release()
        _held.clear()


# ---------------------------------------------------------------------------- recovery

def _leftovers(final: Path, kind: str) -> list[Path]:
    prefix = f".{final.name}.{kind}-"
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    return sorted((p for p in entries if p.name.startswith(prefix)),
                  key=lambda p: p.lstat().st_mtime)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _size(p: Path) -> int:
    if not p.is_dir():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file())


def recover(final: Path) -> None:
    """Under the output's lock: restore an old artifact that an interrupted two-rename replace
    left aside, and remove temporary entries of killed writers (they hold no lock, so none is live)."""
    olds = _leftovers(final, "old")
    if olds and not os.path.lexists(final):
        os.rename(olds[-1], final)
        _note(f"restored `{final}` from `{olds[-1].name}`, left by an interrupted replace")
        olds = olds[:-1]
    for p in olds + _leftovers(final, "tmp"):
        size = _size(p)
        _remove(p)
        _note(f"removed `{p.name}` ({size / 1e6:.1f} MB) beside `{final.name}`, left by a killed run")


# ---------------------------------------------------------------------------- publishing

_renameat2: Callable | None | bool = False  # False: not looked up yet


def _exchange_fn():
    global _renameat2
    if _renameat2 is False:
        _renameat2 = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):  # not Linux/glibc >= 2.28
            pass
    return _renameat2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths. False when the system or filesystem cannot."""
    fn = None if os.environ.get(NO_EXCHANGE_ENV) else _exchange_fn()
    if fn is None:
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _pause(stage: str) -> None:
    """Test hook: announce ``stage`` on stderr and sleep, so a test can kill the process inside
    the publish window (inactive unless SURGERY_TEST_SWAP_PAUSE is set)."""
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        import sys

        print(f"surgery-test-pause {stage}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM so a publish step is never cut in half by a Python exception."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _publish(tmp: Path, final: Path) -> None:
    with _signals_held():
        _publish_now(tmp, final)
        published.append(final)


def _publish_now(tmp: Path, final: Path) -> None:
    if not os.path.lexists(final) or not final.is_dir() or not tmp.is_dir():
        _pause("rename")
        os.replace(tmp, final)
        return
    _pause("publish")
    if exchange(tmp, final):
        _pause("exchanged")
        _remove(tmp)  # now the old artifact
        return
    # Fallback: two renames; recover() repairs a kill between them.
    old = final.parent / f".{final.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
    os.replace(final, old)
    _pause("between-renames")
    os.replace(tmp, final)
    _remove(old)


def _private_tmp(final: Path, *, directory: bool) -> Path:
    prefix = f".{final.name}.tmp-{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def _locked(path: str | os.PathLike) -> Iterator[Path]:
    try:
        final = claim(path)
    except OutputLocked as e:
        from surgery.diagnostics import Code, error

        raise error(Code.E0804, str(e), help="wait for the other run to finish, or write elsewhere")
    try:
        yield final
    finally:
        release(final)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` atomically.

    On any exception (a signal included) the temporary directory is removed and ``path`` is left
    as it was.
    """
    with _locked(path) as final:
        tmp = _private_tmp(final, directory=True)
        try:
            yield tmp
            _pause("written")  # signals are not held yet: an interrupt here discards tmp
            _publishable(tmp)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _publishable(tmp: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; published artifacts get normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    if tmp.is_dir():
        tmp.chmod(0o777 & ~umask)
        for p in tmp.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
    else:
        tmp.chmod(0o666 & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; renamed over ``path`` on success."""
    with _locked(path) as final:
        tmp = _private_tmp(final, directory=False)
        try:
            yield tmp
            _publishable(tmp)
            _publish(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
