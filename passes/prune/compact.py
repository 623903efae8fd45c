"""Compact N:M storage: the kept values plus the in-group position of each, bit-packed.

For a weight ``(out, in)`` with exactly N kept slots per group of M input columns:
- ``values``: ``(out, in // M * N)``, the kept weights in column order (same dtype as the weight);
- ``indices``: uint8, the position (0..M-1) of each kept value inside its group, packed
  ``8 // bits`` per byte with ``bits`` = 1, 2, 4 or 8 (the smallest that holds M-1); the first
  index of a byte sits in its lowest bits (the int4 nibble order of ops.md §8.3).
2:4 fp16 thus costs 2 bytes per kept value plus 2 bits; unpacking is exact (values are copied,
never recomputed), and the kept *slots* round-trip even where a kept weight is 0.
"""

from __future__ import annotations

import torch

MAX_M = 256  # positions must fit in one byte


def index_bits(m: int) -> int:
    need = max(1, (m - 1).bit_length())
    for b in (1, 2, 4, 8):
        if need <= b:
            return b
    raise ValueError(f"M={m} is too large for compact storage (at most {MAX_M})")


def pack_nm(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed indices) of an N:M-masked weight. ``keep`` must be exactly N:M."""
    rows, cols = weight.shape
    groups = cols // m
    g = keep.reshape(rows, groups, m)
    if cols % m or not bool((g.sum(-1) == n).all()):
        raise ValueError(f"mask is not exactly {n}:{m}")
    # positions of the kept slots in ascending order: sort (not kept, position) keys
    pos = torch.arange(m, device=weight.device).expand(rows, groups, m)
    key = (~g).to(torch.int64) * m + pos
    idx = torch.sort(key, dim=-1).values[..., :n] % m  # (rows, groups, n)
    values = torch.gather(weight.reshape(rows, groups, m), -1, idx).reshape(rows, groups * n)
    return values.contiguous(), _pack_bits(idx.reshape(rows, groups * n), index_bits(m))


def unpack_nm(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_nm`: the dense weight (zeros elsewhere) and its keep mask."""
    rows = values.shape[0]
    groups = in_features // m
    idx = _unpack_bits(indices, index_bits(m), groups * n).reshape(rows, groups, n).long()
    weight = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
    weight.scatter_(-1, idx, values.reshape(rows, groups, n))
    keep = torch.zeros(rows, groups, m, dtype=torch.bool, device=values.device)
    keep.scatter_(-1, idx, True)
    return weight.reshape(rows, in_features), keep.reshape(rows, in_features)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, count = codes.shape
    per = 8 // bits
    pad = (-count) % per
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[0], -1)[:, :count]
