"""Weight-only int8 / int4 linear layers as ``torch.library`` custom ops (namespace ``surgery``).

The CPU implementation is the plain-PyTorch reference: dequantise the whole weight to float32,
then ``F.linear``. It is also the test oracle for other backends. Other backends register kernels
for the same ops (``torch.library.register_kernel("surgery::int4_linear", "cuda")(fn)``); the ONNX
exporter translates them (backends/onnx/translations.py). Fake implementations make
``torch.export`` / ``torch.compile`` work.

Signatures (N = out_features, K = in_features, G = number of groups, group = K // G)::

    surgery::int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias)
        -> Tensor
        qweight: (N, K) int8 signed codes when ``zeros`` is None (symmetric, w = q * s),
                 (N, K) uint8 codes when ``zeros`` is given (w = (q - z) * s)
    surgery::int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias,
                         int in_features) -> Tensor
        qweight: (N, ceil(K / 2)) uint8, two codes per byte along K: element 2k in the low
                 nibble, 2k+1 in the high nibble (odd K padded with 0). Codes are signed
                 two's-complement nibbles [-8, 7] when ``zeros`` is None, unsigned [0, 15]
                 otherwise.
    common:  x (..., K) float; scales (N, G) float32; zeros (N, G) uint8 integer zero points;
             bias (N,) or None; result (..., N) in x's dtype.
             dequant(w)[n, k] = (q[n, k] - z[n, k // group]) * s[n, k // group]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgery.backends.ops.registry import Lazy, Op, register_op


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes (..., n) (signed [-8, 7] or unsigned [0, 15]) into uint8 (..., ceil(n/2)).

    Element 2k goes to the low nibble, 2k+1 to the high nibble; odd n is padded with 0.
    """
    c = codes.to(torch.int32) & 0xF
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    lo, hi = c[..., 0::2], c[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., ceil(n/2)) -> int8 codes (..., n)."""
    # uint8 ops only (no widening): this runs per forward on the reference path
    c = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :n].view(torch.int8)
    if signed:
        c = (c ^ 8) - 8  # two's-complement nibble -> [-8, 7]
    return c


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """(N, K) integer codes -> (N, K) float32 weights with (N, G) group parameters."""
    n, k = q.shape
    g = scales.shape[1]
    # one fresh fp32 tensor, updated in place (same arithmetic, fewer passes and allocations)
    w = q.to(torch.float32, copy=True).reshape(n, g, k // g)
    if zeros is not None:
        w.sub_(zeros.to(torch.float32).unsqueeze(-1))
    return w.mul_(scales.to(torch.float32).unsqueeze(-1)).reshape(n, k)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    in_features: int) -> torch.Tensor:
    return dequantize(unpack_int4(qweight, in_features, signed=zeros is None), scales, zeros)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = w.to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("surgery::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear(x, dequantize(qweight, scales, zeros), bias)


@int8_linear.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("surgery::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bias: torch.Tensor | None,
                in_features: int) -> torch.Tensor:
    return _linear(x, dequantize_int4(qweight, scales, zeros, in_features), bias)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, bias, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# Autograd: the weights are frozen integers, but gradients flow to x (adapters train on top of a
# quantised base) and to a float bias if it requires grad.


def _grad_bias(grad: torch.Tensor, bias: torch.Tensor | None):
    if bias is None or not bias.requires_grad:
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)


def _setup8(ctx, inputs, output):
    x, qweight, scales, zeros, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros, bias)


def _backward8(ctx, grad):
    qweight, scales, zeros, bias = ctx.saved_tensors
    gx = grad @ dequantize(qweight, scales, zeros).to(grad.dtype)
    return gx, None, None, None, _grad_bias(grad, bias)


def _setup4(ctx, inputs, output):
    x, qweight, scales, zeros, bias, in_features = inputs
    ctx.in_features = in_features
    ctx.save_for_backward(qweight, scales, zeros, bias)


def _backward4(ctx, grad):
    qweight, scales, zeros, bias = ctx.saved_tensors
    gx = grad @ dequantize_int4(qweight, scales, zeros, ctx.in_features).to(grad.dtype)
    return gx, None, None, None, _grad_bias(grad, bias), None


int8_linear.register_autograd(_backward8, setup_context=_setup8)
int4_linear.register_autograd(_backward4, setup_context=_setup4)


# Exported by the quantization layouts (backends/onnx/quant_layout.py), not by a translation.
def _int8_reference(x, qweight, scales, zeros, bias):
    return _linear(x, dequantize(qweight, scales, zeros), bias)


def _int4_reference(x, qweight, scales, zeros, bias, in_features):
    return _linear(x, dequantize_int4(qweight, scales, zeros, in_features), bias)


_TRITON = "surgery.backends.triton.quant_matmul"
register_op(Op("int8_linear", reference=_int8_reference, kernel=Lazy(f"{_TRITON}:int8_linear"),
               sites=(("quant", 8),)))
register_op(Op("int4_linear", reference=_int4_reference, kernel=Lazy(f"{_TRITON}:int4_linear"),
               sites=(("quant", 4),)))
