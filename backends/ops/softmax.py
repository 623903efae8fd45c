"""The classic softmax as a custom op: the comparison baseline for the StableMax kernels.

``surgery::softmax(x, dim, algorithm)`` computes ``torch.softmax`` over ``dim``; ``algorithm``
only selects the GPU kernel (spec ops.md §3):

- ``"fused"``: the whole row on chip, 1 read + 1 write (Triton fused-softmax tutorial, §3.4);
- ``"online"``: running max and rescaled sum over tiles, then a normalising pass (§3.3);
- ``"two_pass"``: Dukhan & Ablavatski's extended-exponent sum, no max pass (§3.2).

All three equal ``torch.softmax`` (the reference, and the implementation for CPU tensors). Math in
float32, result in the input dtype. A fully ``-inf`` row gives NaN, as in ``torch.softmax``.
"""

from __future__ import annotations

import torch

from surgery.backends.ops.registry import Lazy, Op, register_op

ALGORITHMS = ("fused", "online", "two_pass")


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.softmax(x.to(cd), dim).to(x.dtype)


@torch.library.custom_op("surgery::softmax", mutates_args=())
def softmax(x: torch.Tensor, dim: int, algorithm: str) -> torch.Tensor:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown softmax algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    return softmax_reference(x, dim)


@softmax.register_fake
def _(x, dim, algorithm):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf, g = y.to(cd), grad.to(cd)
    dx = yf * (g - (g * yf).sum(ctx.dim, keepdim=True))
    return dx.to(y.dtype), None, None


softmax.register_autograd(_backward, setup_context=_setup)


def _op_reference(x: torch.Tensor, dim: int, algorithm: str) -> torch.Tensor:
    """The op's arguments, the reference's maths (every algorithm computes softmax)."""
    return softmax_reference(x, dim)


register_op(Op("softmax", reference=_op_reference, kernel=Lazy("surgery.backends.triton.softmax:softmax_forward"),
               onnx="surgery.backends.onnx.translations_kernels:softmax", sites=(("generic", None),)))
