"""Packed weight-only int8 / int4 CPU kernels for ``QuantLinear``: aten's "tinygemm" ops.

PyTorch ships two weight-only CPU kernels (aten/src/ATen/native/cpu/int{8,4}mm_kernel.cpp):

- ``aten._weight_int8pack_mm(x (M, K), w int8 (N, K), s (N,))`` = ``x @ (w * s[:, None]).T``:
  one scale per output channel, no zero point, ``s`` in x's dtype. The vectorised loop reads K
  in steps of 16 with aligned loads of x, so K % 16 == 0 and x rows must be 32-byte aligned.
- ``aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K) in [0, 15], 1)`` -> uint8 (N, K/2)
  in a layout that depends on the CPU's vector width (AVX-512 / AVX2 / scalar), so it is built at
  run time and never saved; N % 16 == 0.
- ``aten._weight_int4pack_mm_for_cpu(x, packed, G, sz (K/G, N, 2))`` with
  ``w[n, k] = (q[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]``, G in {32, 64, 128, 256}.

Our stored format (formats.py) maps onto them as follows (``s`` = scales, ``z`` = zero points):

- int8 symmetric per-channel: ``w = q * s`` is the kernel's formula, codes as stored.
- int4 symmetric: stored nibble ``c & 0xF`` of a code ``c`` in [-8, 7]; the kernel's code is
  ``c + 8 = nibble ^ 8`` with ``sz = (s, 0)``: ``(c + 8 - 8) * s = c * s``.
- int4 asymmetric: the kernel's code is the stored nibble ``q`` with ``sz = (s, (8 - z) * s)``:
  ``(q - 8) * s + (8 - z) * s = (q - z) * s``.
- A group that is a multiple of a kernel group G (per-channel included) uses G with every
  group's parameters repeated ``group / G`` times, which is the same weight.

On x86 only the bfloat16 instantiations are vectorised (AVX-512 / AVX2); fp32 and fp16 run a
scalar loop. The fp32 loop computes the formula above exactly up to summation order, but on x86
it is no faster than dequantising the weight (measured: 0.8 vs 0.3 ms int8, 1.7 vs 1.7 ms int4
on a 576 x 1536 layer at one row), so forward uses it only where ``MAX_ROWS`` allows (nowhere by
default; tests enable it to pin the mapping). bf16 is the fast path (its error bound is derived
in docs/passes/quantize.md). The kernels stream the weight once per block of 4 rows, so for many
rows (prefill) dequantising once + a GEMM is faster: see ``MAX_ROWS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the qGroupSize values aten's int4 CPU kernel takes

# Rows (tokens) up to which forward uses the packed kernel, per activation dtype and bit width.
# bf16: where it beat dequantise + GEMM on a 576 x 1536 layer on the 2-core AVX-512 x86
# (int8: 0.07 vs 1.0 ms at 1 row, even at 32; int4: 0.07 vs 2.0 ms at 1 row, 2.0 vs 31 at 64,
# even at 128). fp32: 0 (the scalar loop is not faster, see above). Other dtypes (fp16) and
# larger row counts take the reference path.
MAX_ROWS = {torch.bfloat16: {8: 16, 4: 64}, torch.float32: {8: 0, 4: 0}}


@dataclass(frozen=True)
class PackedInt8:
    qweight: torch.Tensor  # (N, K) int8, the stored codes
    scales: torch.Tensor  # (N,) in the activation dtype


@dataclass(frozen=True)
class PackedInt4:
    packed: torch.Tensor  # (N, K / 2) uint8 in aten's CPU-specific layout
    group: int  # the kernel group size G
    scales_and_zeros: torch.Tensor  # (K / G, N, 2) in the activation dtype


Packed = PackedInt8 | PackedInt4


def int4_kernel_group(group: int) -> int | None:
    """The largest kernel group dividing ``group`` (the same weight with repeated params)."""
    for g in INT4_KERNEL_GROUPS:
        if group % g == 0:
            return g
    return None


def unsupported_reason(bits: int, group: int, symmetric: bool, in_features: int,
                       out_features: int, dtype: torch.dtype) -> str | None:
    """Why this layer / activation dtype cannot use a packed kernel (None if it can)."""
    if dtype not in MAX_ROWS:
        return f"activations in {str(dtype).removeprefix('torch.')} (kernels: bfloat16, float32)"
    if MAX_ROWS[dtype][bits] == 0:
        return (f"{str(dtype).removeprefix('torch.')} kernels disabled (MAX_ROWS 0: a scalar loop "
                "on x86, not faster than the reference)")
    if bits == 8:
        if not symmetric:
            return "int8 with zero points (the int8 kernel has none)"
        if group != in_features:
            return "grouped int8 (the int8 kernel has one scale per output channel)"
        if in_features % 16:
            return f"in_features {in_features} not a multiple of 16 (int8 kernel)"
        return None
    if int4_kernel_group(group) is None:
        return f"int4 group {group} not a multiple of 32 (kernel groups: 32, 64, 128, 256)"
    if out_features % 16:
        return f"out_features {out_features} not a multiple of 16 (int4 kernel)"
    return None


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> PackedInt8:
    return PackedInt8(qweight.contiguous(), scales[:, 0].to(torch.float32).to(dtype).contiguous())


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              in_features: int, group: int, dtype: torch.dtype) -> PackedInt4:
    from surgery.backends.ops.quant import unpack_int4

    nibbles = unpack_int4(qweight, in_features, signed=False).to(torch.int32)
    if zeros is None:
        nibbles = nibbles ^ 8  # two's-complement c -> c + 8
    s = scales.to(torch.float32)
    # (8 - z) * s in fp32, rounded once to the activation dtype
    z = torch.zeros_like(s) if zeros is None else (8.0 - zeros.to(torch.float32)) * s
    g = int4_kernel_group(group)
    rep = group // g
    sz = torch.stack((s.repeat_interleave(rep, 1), z.repeat_interleave(rep, 1)), dim=-1)
    sz = sz.transpose(0, 1).to(dtype).contiguous()  # (K / G, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.contiguous(), 1)
    return PackedInt4(packed, g, sz)


def pack(bits: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         in_features: int, group: int, dtype: torch.dtype) -> Packed:
    """The kernel operands for one layer and activation dtype (call once, then reuse)."""
    with torch.no_grad():
        if bits == 8:
            return pack_int8(qweight, scales, dtype)
        return pack_int4(qweight, scales, zeros, in_features, group, dtype)


def packed_linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., K) @ W.T + bias`` with the packed kernel; result in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    # A fresh contiguous copy: the int8 kernel's aligned loads need a 64-byte aligned base
    # (views such as hidden[:, -1:] are not); the copy is M x K, tiny next to the weight.
    x2 = x.reshape(-1, k).clone(memory_format=torch.contiguous_format)
    if isinstance(packed, PackedInt8):
        y = torch.ops.aten._weight_int8pack_mm(x2, packed.qweight, packed.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed.packed, packed.group,
                                                        packed.scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])
