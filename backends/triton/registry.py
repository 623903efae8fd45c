"""Which Triton launcher implements which ``surgery::`` op, and their CUDA registration.

``KERNELS`` maps an op name to its launcher. The CUDA implementation registered with
``torch.library`` looks the launcher up at call time, so a test can swap one in (the lowering
gate's "deliberately wrong kernel" test does). Inputs a kernel does not cover (float64, head dims
above 256) go to the op's plain-PyTorch reference.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from surgery.backends.ops import quant as quant_ops
from surgery.backends.ops import softmax as softmax_ops
from surgery.backends.ops import softplus_attention as spa_ops
from surgery.backends.ops import stablemax as stablemax_ops
from surgery.backends.triton import quant_matmul, softmax, softplus_attention, stablemax
from surgery.backends.triton.common import KERNEL_DTYPES

MAX_HEAD_DIM = 256

KERNELS: dict[str, Callable] = {
    "stablemax": lambda x, dim: stablemax.stablemax_forward(x, dim, log=False),
    "log_stablemax": lambda x, dim: stablemax.stablemax_forward(x, dim, log=True),
    "stablemax_backward": lambda x, g, dim, log: stablemax.stablemax_backward(x, g, dim, log),
    "softmax": lambda x, dim, algorithm: softmax.softmax_forward(x, dim, algorithm),
    "softplus_attention": softplus_attention.softplus_attention_forward,
    "int4_linear": quant_matmul.int4_linear,
    "int8_linear": quant_matmul.int8_linear,
}

# op name -> (reference used for inputs the kernel does not cover, "does the kernel cover it?")
_REFERENCES: dict[str, tuple[Callable, Callable[..., bool]]] = {
    "stablemax": (stablemax_ops.stablemax_reference, lambda x, *a: x.dtype in KERNEL_DTYPES),
    "log_stablemax": (stablemax_ops.log_stablemax_reference,
                      lambda x, *a: x.dtype in KERNEL_DTYPES),
    "stablemax_backward": (stablemax_ops.stablemax_backward_reference,
                           lambda x, *a: x.dtype in KERNEL_DTYPES),
    "softmax": (lambda x, dim, algorithm: softmax_ops.softmax_reference(x, dim),
                lambda x, *a: x.dtype in KERNEL_DTYPES),
    "softplus_attention": (spa_ops.softplus_attention_reference,
                           lambda q, k, v, *a: q.dtype in KERNEL_DTYPES
                           and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
                           and k.dtype == q.dtype and v.dtype == q.dtype),
    "int4_linear": (lambda x, qw, s, z, b, k: quant_ops._linear(
        x, quant_ops.dequantize_int4(qw, s, z, k), b), lambda x, *a: x.dtype in KERNEL_DTYPES),
    "int8_linear": (lambda x, qw, s, z, b: quant_ops._linear(x, quant_ops.dequantize(qw, s, z), b),
                    lambda x, *a: x.dtype in KERNEL_DTYPES),
}

OPS = tuple(k for k in KERNELS if k != "stablemax_backward")

_registered = False


_reference_only = False


@contextlib.contextmanager
def reference_only():
    """Run every ``surgery::`` op with its plain-PyTorch reference while the block runs.

    The lowering gate computes its oracle this way: on a GPU the CUDA implementation of, say,
    ``surgery::int4_linear`` is the Triton kernel even in a module that was never lowered, so
    "the module before lowering" would otherwise be the kernel compared with itself.
    """
    global _reference_only
    old, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = old


def run(name: str, *args):
    """Run op ``name`` with its Triton launcher, or its reference for uncovered inputs."""
    ref, covered = _REFERENCES[name]
    if covered(*args) and not _reference_only:
        return KERNELS[name](*args)
    return ref(*args)


def register_cuda_kernels() -> None:
    """Register ``run`` as the CUDA implementation of every op (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in KERNELS:
        torch.library.register_kernel(f"surgery::{name}", "cuda",
                                      lambda *args, _n=name: run(_n, *args))
