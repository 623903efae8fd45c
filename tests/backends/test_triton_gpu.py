"""Compiled Triton kernels on a real GPU (skipped without CUDA).

The kernel checks run in a subprocess without TRITON_INTERPRET, because the interpreter tests in
this session set it and triton decides interpreted vs compiled when a kernel is defined.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none available)"),
]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                          text=True, timeout=1800)


def test_kernels_match_references_on_gpu():
    pytest.importorskip("triton", reason="triton is not installed")
    res = _run("surgery.backends.triton.selfcheck")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: Triton kernels on" in res.stdout


def test_kernel_benchmark_runs_on_gpu(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    res = subprocess.run([sys.executable, "benchmarks/kernels.py", "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=1800,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "kernels.csv").exists() and (tmp_path / "kernels.png").exists()
