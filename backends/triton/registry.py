"""Which Triton launcher implements which ``surgery::`` op, and their CUDA registration.

Read from the op records (backends/ops/registry.py). ``KERNELS`` maps an op name to its
launcher. The CUDA implementation registered with ``torch.library`` looks the launcher up at call
time, so a test can swap one in (the lowering gate's "deliberately wrong kernel" test does).
Inputs a kernel does not cover (``Op.covers``: float64, head dims above 256) go to the op's
plain-PyTorch reference.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from surgery.backends.ops.registry import Lazy, all_ops


def _launcher(kernel: Callable) -> Callable:
    return kernel.resolve() if isinstance(kernel, Lazy) else kernel


# op name -> Triton launcher, from the op records (backends/ops/*). A dict, so a test can swap a
# launcher in; the CUDA registration below looks it up at call time.
KERNELS: dict[str, Callable] = {name: _launcher(op.kernel) for name, op in all_ops().items()
                                if op.kernel is not None}

OPS = tuple(name for name, op in all_ops().items() if op.kernel is not None and op.sites)

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
    op = all_ops()[name]
    if op.covers(*args) and not _reference_only:
        return KERNELS[name](*args)
    return op.reference(*args)


def register_cuda_kernels() -> None:
    """Register ``run`` as the CUDA implementation of every op (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in KERNELS:
        torch.library.register_kernel(f"surgery::{name}", "cuda",
                                      lambda *args, _n=name: run(_n, *args))
