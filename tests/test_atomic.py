"""Crash-safe publishing (surgery/atomic.py): kills inside the swap window never leave the output
path missing; leftovers of killed runs are restored or removed at the next run; a lock keeps two
writers of one output apart."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from surgery import atomic

ATOMIC_PY = Path(atomic.__file__)

# A writer that loads surgery/atomic.py on its own (it needs only the standard library), so each
# run starts in a fraction of a second and a test can kill many of them.
WRITER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("atomic_standalone", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
out, version, mode = sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "hold":
    atomic.claim(out)
    print("held", flush=True)
    sys.stdin.read()
    atomic.release(out)
    sys.exit(0)
try:
    with atomic.atomic_dir(out) as tmp:
        for name in ("a.bin", "b.bin"):
            (tmp / name).write_bytes(version.encode() * 100_000)
        (tmp / "surgery.json").write_text(version)
        print("written", flush=True)
        if mode == "stall":
            import time; time.sleep(60)
except Exception as e:  # the E0804 SurgeryError atomic_dir makes of OutputLocked
    print("refused", type(e).__name__, e, flush=True)
    sys.exit(3)
"""


def writer(out: Path, version: str, mode: str = "write", pause: float | None = None,
           exchange: bool = True, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (atomic.PAUSE_ENV, atomic.NO_EXCHANGE_ENV)}
    if pause is not None:
        env[atomic.PAUSE_ENV] = str(pause)
    if not exchange:
        env[atomic.NO_EXCHANGE_ENV] = "1"
    return subprocess.Popen([sys.executable, "-c", WRITER, str(ATOMIC_PY), str(out), version, mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def artifact_version(out: Path) -> str:
    """The version of a complete artifact (every file present and of that version)."""
    v = (out / "surgery.json").read_text()
    for name in ("a.bin", "b.bin"):
        assert (out / name).read_bytes() == v.encode() * 100_000
    return v


def exchange_supported(tmp_path: Path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a")
    ok = atomic.exchange(a, b)
    if ok:
        assert (b / "f").read_text() == "a"
    return ok


def wait_for_stage(p: subprocess.Popen, stage: str) -> None:
    """Read the writer's stderr up to the announcement of pause ``stage``."""
    seen = []
    for line in p.stderr:
        seen.append(line.strip())
        if line.startswith(f"surgery-test-pause {stage}"):
            return
    raise AssertionError(f"no pause {stage!r}; saw {seen}")


def _kill_in_window(out: Path, version: str, pause: float, exchange: bool, seen_missing: list):
    """Start a writer, wait for its first publish pause, kill it at a random moment of the
    window, while a thread watches the output path for a missing instant."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not os.path.isdir(out):
                seen_missing.append(time.monotonic())

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    p = writer(out, version, pause=pause, exchange=exchange)
    try:
        wait_for_stage(p, "publish")  # then "exchanged": the window spans both pauses
        time.sleep(random.uniform(0, 2 * pause))
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        time.sleep(0.01)
        stop.set()
        w.join()
        if p.poll() is None:
            p.kill()


def test_kills_at_the_swap_never_leave_the_output_missing(tmp_path):
    if not exchange_supported(tmp_path):
        pytest.skip("this filesystem or system has no RENAME_EXCHANGE (the fallback is tested below)")
    random.seed(0)
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as t:
        for name in ("a.bin", "b.bin"):
            (t / name).write_bytes(b"0" * 100_000)
        (t / "surgery.json").write_text("0")
    missing: list = []
    versions = set()
    for i in range(1, 13):
        _kill_in_window(out, str(i), pause=0.15, exchange=True, seen_missing=missing)
        assert not missing, f"output path missing after kill {i}"
        versions.add(artifact_version(out))  # old or new, and complete
    assert len(versions) > 1  # some kills landed before the exchange, some after
    # The killed writers' temporary directories are removed, and reported, at the next claim.
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert left
    atomic.take_notes()
    atomic.claim(out)
    atomic.release(out)
    notes = atomic.take_notes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(notes) == len(left) and all("left by a killed run" in n for n in notes)


def test_fallback_kill_between_renames_is_restored_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as t:
        for name in ("a.bin", "b.bin"):
            (t / name).write_bytes(b"0" * 100_000)
        (t / "surgery.json").write_text("0")
    p = writer(out, "1", pause=1, exchange=False)
    wait_for_stage(p, "between-renames")
    p.kill()
    p.wait(10)
    assert not out.exists()  # the window the fallback has
    assert [q for q in tmp_path.iterdir() if q.name.startswith(".out.old-")]
    atomic.take_notes()
    atomic.claim(out)
    atomic.release(out)
    assert artifact_version(out) == "0"
    assert any(n.startswith("restored") for n in atomic.take_notes())
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]


def test_second_writer_of_one_output_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = writer(out, "0", mode="hold", stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = writer(out, "1")
        so, se = second.communicate(timeout=60)
        assert second.returncode == 3 and "E0804" in so and "another surgery process" in so
        with pytest.raises(atomic.OutputLocked):
            atomic.claim(out)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert not out.exists()
    # Released: the lock file went with the holder, and a new writer succeeds.
    p = writer(out, "2")
    p.communicate(timeout=60)
    assert p.returncode == 0 and artifact_version(out) == "2"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]


def test_concurrent_apply_gets_a_located_lock_error(tmp_path, tiny_llama):
    import surgery
    from surgery.diagnostics import SurgeryError

    out = tmp_path / "out"
    holder = writer(out, "0", mode="hold", stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SurgeryError) as e:
            surgery.apply(tiny_llama, f'quantize type(Linear) to int8\nsave "{out}"\n')
    finally:
        holder.stdin.close()
        holder.wait(10)
    d = e.value.diagnostics[0]
    assert d.code == "E0804" and d.span.line == 2 and "another surgery process" in d.message
    assert sorted(q.name for q in tmp_path.iterdir()) == []


def test_apply_after_a_killed_save_removes_its_temp_dir(tmp_path, tiny_llama):
    import surgery
    from surgery.progress import LogProgress

    out = tmp_path / "out"
    p = writer(out, "1", mode="stall")
    assert p.stdout.readline().strip() == "written"
    p.kill()
    p.wait(10)
    stale = [q for q in tmp_path.iterdir() if q.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / "a.bin").exists()
    log = io.StringIO()
    surgery.apply(tiny_llama, f'quantize type(Linear) to int8\nsave "{out}"\n',
                  progress=LogProgress(log))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]
    assert f"removed `{stale[0].name}`" in log.getvalue()
    assert (out / "surgery.json").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(out) as t:
            (t / "x").write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
