"""StableMax and log-StableMax as ``torch.library`` custom ops (spec ops.md §1.1-1.2, §3.5).

    s(x) = x + 1 (x >= 0),  1 / (1 - x) (x < 0)
    stablemax(x)_i     = s(x_i) / sum_j s(x_j)
    log_stablemax(x)_i = log s(x_i) - log sum_j s(x_j),  log s(x) = log1p(x) | -log1p(-x)

The reduction runs over ``dim``. Math is done in float32 (float64 stays float64) and the result
has the input dtype. StableMax is not shift-invariant: no max is ever subtracted.
``-inf`` inputs give s = 0 (they act as masking); a row that is entirely ``-inf`` has S = 0 and
gives NaN, exactly like ``torch.softmax`` on a fully masked row.

The default implementation (every device) is the plain-PyTorch reference below; it is also the
test oracle. ``surgery.backends.triton`` registers Triton kernels for CUDA tensors.

Backward (y = s / S):
    stablemax:      dx_j = s'(x_j) / S * (g_j - sum_i g_i y_i)
    log_stablemax:  dx_j = g_j / (1 + |x_j|) - (sum_i g_i) * s'(x_j) / S
with s'(x) = 1 for x >= 0 and s(x)^2 for x < 0, and s'/s = 1 / (1 + |x|).
"""

from __future__ import annotations

import torch

from surgery.backends.ops.registry import Lazy, Op, register_op


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def s_map(x: torch.Tensor) -> torch.Tensor:
    """The element map s(x) (spec §1.1), in x's dtype."""
    return torch.where(x < 0, 1.0 / (1.0 - x), x + 1.0)


def log_s_map(x: torch.Tensor) -> torch.Tensor:
    """log s(x) without the division: log1p(x) for x >= 0, -log1p(-x) for x < 0."""
    return torch.where(x < 0, -torch.log1p(-x), torch.log1p(x))


def s_prime(x: torch.Tensor) -> torch.Tensor:
    """s'(x): 1 for x >= 0, 1 / (1 - x)^2 for x < 0."""
    s = 1.0 / (1.0 - x)
    return torch.where(x < 0, s * s, torch.ones_like(x))


def stablemax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    xf = x.to(_compute_dtype(x))
    s = s_map(xf)
    return (s / s.sum(dim, keepdim=True)).to(x.dtype)


def log_stablemax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    xf = x.to(_compute_dtype(x))
    log_sum = torch.log(s_map(xf).sum(dim, keepdim=True))
    return (log_s_map(xf) - log_sum).to(x.dtype)


def stablemax_backward_reference(x: torch.Tensor, grad: torch.Tensor, dim: int = -1,
                                 log: bool = False) -> torch.Tensor:
    """Analytic gradient of (log-)StableMax w.r.t. x, given the upstream gradient."""
    cd = _compute_dtype(x)
    xf, g = x.to(cd), grad.to(cd)
    s = s_map(xf)
    total = s.sum(dim, keepdim=True)
    if log:
        dx = g / (1.0 + xf.abs()) - g.sum(dim, keepdim=True) * s_prime(xf) / total
    else:
        y = s / total
        dx = s_prime(xf) / total * (g - (g * y).sum(dim, keepdim=True))
    return dx.to(x.dtype)


@torch.library.custom_op("surgery::stablemax", mutates_args=())
def stablemax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return stablemax_reference(x, dim)


@torch.library.custom_op("surgery::log_stablemax", mutates_args=())
def log_stablemax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return log_stablemax_reference(x, dim)


@torch.library.custom_op("surgery::stablemax_backward", mutates_args=())
def stablemax_backward(x: torch.Tensor, grad: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return stablemax_backward_reference(x, grad, dim, log)


@stablemax.register_fake
def _(x, dim):
    return torch.empty_like(x)


@log_stablemax.register_fake
def _(x, dim):
    return torch.empty_like(x)


@stablemax_backward.register_fake
def _(x, grad, dim, log):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, dim = inputs
    ctx.dim = dim
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.surgery.stablemax_backward(x, grad, ctx.dim, False), None


def _backward_log(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.surgery.stablemax_backward(x, grad, ctx.dim, True), None


stablemax.register_autograd(_backward, setup_context=_setup)
log_stablemax.register_autograd(_backward_log, setup_context=_setup)


register_op(Op("stablemax", reference=stablemax_reference,
               kernel=Lazy("surgery.backends.triton.stablemax:stablemax_forward", log=False),
               onnx="surgery.backends.onnx.translations_kernels:stablemax", sites=(("generic", None), ("attention", "stablemax"))))
register_op(Op("log_stablemax", reference=log_stablemax_reference,
               kernel=Lazy("surgery.backends.triton.stablemax:stablemax_forward", log=True),
               onnx="surgery.backends.onnx.translations_kernels:log_stablemax", sites=(("generic", None),)))
register_op(Op("stablemax_backward", reference=stablemax_backward_reference,
               kernel=Lazy("surgery.backends.triton.stablemax:stablemax_backward")))
