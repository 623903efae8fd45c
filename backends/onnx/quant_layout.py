"""QuantLinear in ONNX Runtime's layouts, as export-time modules and custom ops.

Before export, every ``QuantLinear`` is swapped (on a copy) for one of these modules, whose
buffers are already the exact initializers ONNX Runtime wants, and whose forward calls an op that
translates 1:1 to ONNX (translations.py):

- ``surgery::matmul_nbits`` -> ``com.microsoft::MatMulNBits`` (int4 and int2; ONNX Runtime 1.32
  runs bits 2, 4 and 8 on CPU and refuses 3, 5, 6, 7 at session creation):
  ``B`` uint8 ``(N, k_blocks, block_size * bits / 8)`` (codes packed least significant bits
  first along K: low nibble first for int4, four per byte for int2), ``scales``
  ``(N * k_blocks,)``, optional ``zero_points`` uint8 ``(N * ceil(k_blocks * bits / 8),)`` (packed
  the same way, each row padded to a byte; absent = 2^(bits-1)), optional bias.
- ``surgery::dq_matmul`` -> ``DequantizeLinear`` + ``MatMul`` (QDQ, int4 or int8):
  ``B`` ``(K, N)`` = Wᵀ codes (int8 container; int4 values are cast to INT4/UINT4 at export;
  int3, int5, int6, int7 (no MatMulNBits in ORT) and int2 with ``int4="qdq"`` stay in the int8 /
  uint8 container, whose values are exactly the codes),
  scale ``(K / block_size, N)`` blocked along axis 0, or ``(N,)`` per channel (axis 1),
  optional zero point of the scale's shape.

The CPU implementations follow the ONNX / ORT definitions, so each export module can be checked
against the QuantLinear it replaces without ONNX Runtime.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.backends.ops.quant import pack_bits, unpack_bits
from surgery.passapi import PassError


def _bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


@torch.library.custom_op("surgery::matmul_nbits", mutates_args=())
def matmul_nbits(A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None, bias: torch.Tensor | None, K: int, N: int,
                 bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    kb = B.shape[1]
    q = unpack_bytes(B.reshape(N, -1), kb * block_size, bits).float()
    q = q.reshape(N, kb, block_size)
    if zero_points is None:
        zp = torch.full((N, kb), float(1 << (bits - 1)))
    else:
        zp = unpack_bytes(zero_points.reshape(N, -1), kb, bits).float()
    w = (q - zp.unsqueeze(-1)) * scales.reshape(N, kb, 1).float()
    w = w.reshape(N, kb * block_size)[:, :K]
    return _bias(F.linear(A, w.to(A.dtype)), bias)


@matmul_nbits.register_fake
def _(A, B, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return A.new_empty((*A.shape[:-1], N))


@torch.library.custom_op("surgery::dq_matmul", mutates_args=())
def dq_matmul(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
              zero_point: torch.Tensor | None, bias: torch.Tensor | None, block_size: int,
              bits: int) -> torch.Tensor:
    b = B.float()
    zp = zero_point.float() if zero_point is not None else torch.zeros_like(scale)
    if block_size:
        s = scale.repeat_interleave(block_size, 0)[: B.shape[0]]
        z = zp.repeat_interleave(block_size, 0)[: B.shape[0]]
    else:
        s, z = scale.unsqueeze(0), zp.unsqueeze(0)
    w = (b - z) * s.float()
    return _bias(A @ w.to(A.dtype), bias)


@dq_matmul.register_fake
def _(A, B, scale, zero_point, bias, block_size, bits):
    return A.new_empty((*A.shape[:-1], B.shape[1]))


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, n) -> uint8 (rows, ceil(n * bits / 8)), least significant bits first
    (ORT's MatMulNBits packing: the little-endian bytes of our int32 bit stream)."""
    rows, n = codes.shape
    words = pack_bits(codes, bits)
    return words.contiguous().view(torch.uint8).reshape(rows, -1)[:, :(n * bits + 7) // 8]


def unpack_bytes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bytes` (int32 codes)."""
    rows, nbytes = packed.shape
    padded = F.pad(packed.to(torch.uint8), (0, -nbytes % 4))
    return unpack_bits(padded.contiguous().view(torch.int32), n, bits)


class _ExportLinear(nn.Module):
    """Shared: the optional input permutation of act_order layers."""

    def _permute(self, x):
        return x.index_select(-1, self.perm) if self.perm is not None else x


class MatMulNBitsLinear(_ExportLinear):
    def __init__(self, q, accuracy_level: int = 0):
        super().__init__()
        K, N, g = q.in_features, q.out_features, q.group
        bs = _pow2_block(g)
        if bs is None:
            raise PassError(f"MatMulNBits needs a power-of-two block (>= 16) dividing the group "
                            f"size {g}", hint='export with int4="qdq", or quantize with a group '
                                              "such as 32, 64 or 128")
        rep = g // bs
        kb = K // bs
        bits = q.bits
        self.K, self.N, self.block_size, self.accuracy_level = K, N, bs, accuracy_level
        self.bits = bits
        codes = q.codes().to(torch.int32)
        scales = q.scales.repeat_interleave(rep, 1)
        if q.symmetric:  # signed codes -> unsigned with the default zero point 2^(bits-1)
            codes = codes + (1 << (bits - 1))
            zp = None
        else:
            zp = pack_bytes(q.zeros.to(torch.int32).repeat_interleave(rep, 1), bits).reshape(-1)
        self.register_buffer("B", pack_bytes(codes, bits).reshape(N, kb, bs * bits // 8))
        self.register_buffer("scales", scales.reshape(-1).to(torch.float32))
        self.register_buffer("zero_points", zp)
        self.register_buffer("bias", None if q.bias is None else q.bias.detach().clone())
        self.register_buffer("perm", None if q.perm is None else q.perm.clone())

    def forward(self, x):
        return torch.ops.surgery.matmul_nbits(self._permute(x), self.B, self.scales,
                                              self.zero_points, self.bias, self.K, self.N,
                                              self.bits,
                                              self.block_size, self.accuracy_level)


class DQMatMulLinear(_ExportLinear):
    def __init__(self, q):
        super().__init__()
        self.bits = q.bits
        per_channel = q.group == q.in_features
        self.block_size = 0 if per_channel else q.group
        codes = q.codes().to(torch.int32).T.contiguous()  # (K, N)
        cdtype = torch.int8 if q.symmetric else torch.uint8
        self.register_buffer("B", codes.to(cdtype))
        s = q.scales.T.contiguous()  # (G, N)
        self.register_buffer("scale", s[0].clone() if per_channel else s)
        zp = None
        if not q.symmetric:
            z = q.zeros.T.contiguous()
            zp = z[0].clone() if per_channel else z
        self.register_buffer("zero_point", zp)
        self.register_buffer("bias", None if q.bias is None else q.bias.detach().clone())
        self.register_buffer("perm", None if q.perm is None else q.perm.clone())

    def forward(self, x):
        return torch.ops.surgery.dq_matmul(self._permute(x), self.B, self.scale, self.zero_point,
                                           self.bias, self.block_size, self.bits)


def _pow2_block(group: int) -> int | None:
    """The largest power of two >= 16 dividing ``group`` (MatMulNBits block sizes)."""
    bs = 1
    while group % (bs * 2) == 0:
        bs *= 2
    return bs if bs >= 16 else None


def export_module(q, int4: str = "matmulnbits", accuracy_level: int = 0) -> nn.Module:
    """The export-time replacement of one QuantLinear: MatMulNBits for int4 and int2 (the widths
    ORT runs it for, besides int8, whose QDQ form it already fuses), QDQ for the rest."""
    if q.bits in (2, 4) and int4 == "matmulnbits":
        return MatMulNBitsLinear(q, accuracy_level)
    return DQMatMulLinear(q)
