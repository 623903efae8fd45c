"""The Triton interpreter tests (test_triton_kernels.py) must run whatever the import order.

They need ``TRITON_INTERPRET=1`` before triton is first imported. In a pytest process where
triton was already loaded for a GPU (``surgery.backends`` registers the CUDA kernels on GPU
machines), test_triton_kernels.py cannot interpret and skips itself; this test then runs that
file in a fresh interpreter with the variable set and no GPU visible, and fails if anything in it
fails or skips. Otherwise it checks that the in-process run will interpret, so exactly one of
the two paths covers the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'surgery[triton]')")

KERNEL_TESTS = Path(__file__).with_name("test_triton_kernels.py")


def _interpreting_in_process() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True  # test_triton_kernels.py will be the first to import it, interpreted
    from surgery.backends.triton.common import interpreting

    return interpreting()


def test_interpreter_tests_cannot_be_skipped_by_import_order():
    if _interpreting_in_process():
        from surgery.backends.triton.common import interpreting

        assert interpreting(), "TRITON_INTERPRET=1 is set but triton is compiling for a GPU"
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-rs", str(KERNEL_TESTS)], env=env, capture_output=True, text=True,
                         cwd=KERNEL_TESTS.parents[2], timeout=1800)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
