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


PIPELINE_ON_GPU = r'''
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import surgery

torch.manual_seed(0)
# SDPA attention: the fused kernel replaces the scaled_dot_product_attention call (an eager
# attention's matmul-softmax-matmul keeps the reference path, counted as a fallback)
cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
model = LlamaForCausalLM(cfg).cuda().eval()
res = surgery.apply(model, """
quantize modules("**.mlp.*_proj") to int4 using rtn(group=32)
swap softmax in type(LlamaAttention) for softplus(reweight=true)
""")
ids = torch.randint(0, 256, (2, 77), device="cuda")
with torch.no_grad():
    before = res.model(ids).logits
res = surgery.apply(res.model, "lower softplus_attention, int4_linear to triton")
step = res.report.steps[-1].report
assert step.metrics["lowered"] == {"softplus_attention": 2, "int4_linear": 6}, step.metrics
with torch.no_grad():
    after = res.model(ids).logits
calls = sum(s["kernel_calls"] for s in step.per_module.values())
err = ((after - before).norm() / before.norm()).item()
print(f"lowered on {torch.cuda.get_device_name()}: gate max_rel_diff "
      f"{step.metrics['max_rel_diff']:.2e}, logits rel err {err:.2e}, kernel calls {calls}")
assert err < 1e-4, err
# the gate compared the kernels with the plain-PyTorch references, not with themselves
assert 0 < step.metrics["max_rel_diff"] < 1e-4, step.metrics
'''


def test_lowered_pipeline_runs_compiled_kernels_on_gpu():
    """quantize + swap + `lower ... to triton` on a CUDA model: compiled kernels, same logits."""
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", PIPELINE_ON_GPU], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lowered on" in res.stdout
