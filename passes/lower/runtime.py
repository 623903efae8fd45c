"""How a lowered module calls a kernel, and the CPU interpreter switch used by tests.

A lowered module calls :func:`call` with an op name. Normally that is the ``surgery::`` custom op,
whose CUDA implementation is the Triton kernel (registered by ``surgery.backends.triton``) and whose
CPU implementation is the plain-PyTorch reference, so ``torch.export`` / ``torch.compile`` / ONNX
export see one custom op. Inside :func:`interpret_on_cpu` (needs ``TRITON_INTERPRET=1`` before
triton is imported) CPU tensors go straight to the Triton launchers in the interpreter instead,
which is how the kernels and the lowering gate are tested on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

from surgery.backends.ops.registry import all_ops

all_ops()  # the custom ops exist once their modules (backends/ops/*) are imported

_interpret = False


@contextlib.contextmanager
def interpret_on_cpu():
    """Run lowered ops on CPU tensors with the Triton interpreter while the block runs."""
    global _interpret
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpret_on_cpu needs TRITON_INTERPRET=1 set before triton is imported")
    from surgery.backends.triton.common import interpreting

    if not interpreting():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; its kernels "
                           "are compiled for a GPU")
    old, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = old


def interpreting_on_cpu() -> bool:
    return _interpret


def call(name: str, *args):
    """Run ``surgery::name`` on ``args`` (the first argument decides the device)."""
    if _interpret and not args[0].is_cuda:
        from surgery.backends.triton.registry import run

        return run(name, *args)
    return getattr(torch.ops.surgery, name)(*args)
