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
    surgery::intn_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias,
                         int in_features, int bits) -> Tensor       (bits 2, 3, 5, 6, 7)
        qweight: (N, ceil(K * bits / 32)) int32, each row a dense little-endian bit stream
                 (see :func:`pack_bits`). Codes are offset to unsigned: a symmetric code c in
                 [-2^(bits-1), 2^(bits-1) - 1] is stored as c + 2^(bits-1); asymmetric codes
                 [0, 2^bits - 1] as they are.
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


def _bit_positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of elements 0..n-1 in a dense ``bits``-wide stream."""
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows, n) in [0, 2^bits) into int32 (rows, ceil(n * bits / 32)).

    Each row is one bit stream: element k occupies stream bits [k * bits, (k + 1) * bits),
    least significant bit first; stream bit j is bit ``j % 32`` of word ``j // 32``. An element
    may straddle two words; unused high bits of the last word are 0. This is the layout of
    compressed-tensors' ``pack_to_int32`` (rows padded to 32 elements, then truncated), so the
    words are its ``weight_packed`` unchanged.
    """
    rows, n = codes.shape
    n_words = (n * bits + 31) // 32
    v = codes.to(torch.int64)
    word, off = _bit_positions(n, bits, codes.device)
    acc = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=codes.device)
    # low part into its word; the bits above 32 spill into the next word (disjoint bit ranges,
    # so adding is the same as or-ing)
    shifted = v << off
    acc.scatter_add_(1, word.expand(rows, n), shifted & 0xFFFFFFFF)
    acc.scatter_add_(1, (word + 1).expand(rows, n), shifted >> 32)
    acc = acc[:, :n_words]
    return torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 (rows, words) -> unsigned codes (rows, n) int32."""
    word, off = _bit_positions(n, bits, packed.device)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))  # the word after the last (straddling reads)
    both = w.index_select(1, word) | (w.index_select(1, word + 1) << 32)
    return ((both >> off) & ((1 << bits) - 1)).to(torch.int32)


def nbits_codes(qweight: torch.Tensor, in_features: int, bits: int, signed: bool) -> torch.Tensor:
    """Codes (N, K) int32 of a dense-packed layer (signed for symmetric layers)."""
    c = unpack_bits(qweight, in_features, bits)
    return c - (1 << (bits - 1)) if signed else c


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


def dequantize_nbits(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     in_features: int, bits: int) -> torch.Tensor:
    return dequantize(nbits_codes(qweight, in_features, bits, signed=zeros is None), scales,
                      zeros)


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


@torch.library.custom_op("surgery::intn_linear", mutates_args=())
def intn_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bias: torch.Tensor | None,
                in_features: int, bits: int) -> torch.Tensor:
    return _linear(x, dequantize_nbits(qweight, scales, zeros, in_features, bits), bias)


@intn_linear.register_fake
def _(x, qweight, scales, zeros, bias, in_features, bits):
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


def _setupn(ctx, inputs, output):
    x, qweight, scales, zeros, bias, in_features, bits = inputs
    ctx.in_features, ctx.bits = in_features, bits
    ctx.save_for_backward(qweight, scales, zeros, bias)


def _backwardn(ctx, grad):
    qweight, scales, zeros, bias = ctx.saved_tensors
    w = dequantize_nbits(qweight, scales, zeros, ctx.in_features, ctx.bits)
    return grad @ w.to(grad.dtype), None, None, None, _grad_bias(grad, bias), None, None


int8_linear.register_autograd(_backward8, setup_context=_setup8)
intn_linear.register_autograd(_backwardn, setup_context=_setupn)
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
