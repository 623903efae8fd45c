"""Integer weight formats (2 to 8 bits): fitting scales/zero points, round-to-nearest, packing.

Conventions (docs/passes/quantize.md has the user-facing version):

- Groups are ``group`` contiguous input columns of one output row; per-channel means
  ``group == in_features``. Weights are handled as ``(out, n_groups, group)`` views.
- Symmetric codes are signed and have no zero point: ``w_hat = q * scale``.
  int8: ``scale = absmax / 127``, ``q in [-127, 127]`` (never clips).
  int2..int7 (ONNX Runtime flavour, shown for int4): ``a`` = the signed extreme of the group,
  ``scale = a / -8``, ``q in [-8, 7]`` (in general ``[-2^(b-1), 2^(b-1) - 1]``); the extreme
  itself is exact, only the opposite side may clip by one step. The scale is therefore negative
  for groups whose extreme is positive, as in ORT.
- Asymmetric codes are unsigned with an integer zero point per group (GPTQ ``Quantizer``):
  ``xmin = min(w, 0)``, ``xmax = max(w, 0)``, ``scale = (xmax - xmin) / maxq``,
  ``zero = round(-xmin / scale)``, ``q = clamp(round(w / scale) + zero, 0, maxq)``,
  ``w_hat = (q - zero) * scale``. 0 maps exactly to ``zero``, so pruned zeros stay zero.
- ``round`` is round-half-to-even (``torch.round``), as in ONNX and GPTQ.
- int4 packing: two codes per byte along the input dimension of each row, element ``2k`` in the
  low nibble and ``2k + 1`` in the high nibble, an odd row padded with 0 (ONNX INT4/UINT4 storage
  and ORT's ``pack_int8_to_int4``). Signed codes are stored as two's-complement nibbles.
- int2, int3, int5, int6, int7 packing: each row is one dense little-endian bit stream in int32
  words (backends/ops/quant.py ``pack_bits``), codes offset to unsigned (symmetric ``c + 2^(b-1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    bits: int  # 2..8
    symmetric: bool

    @property
    def qmin(self) -> int:
        if self.symmetric:
            return -127 if self.bits == 8 else -(1 << (self.bits - 1))
        return 0

    @property
    def qmax(self) -> int:
        if self.symmetric:
            return 127 if self.bits == 8 else (1 << (self.bits - 1)) - 1
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class ClipSearch:
    """Grid search of a clipping ratio per group, minimising the group's squared error."""

    grid: int = 20  # ratios tried: 1, 1 - step, ..., min_ratio
    min_ratio: float = 0.5

    def ratios(self) -> list[float]:
        step = (1.0 - self.min_ratio) / self.grid
        return [1.0 - i * step for i in range(self.grid + 1)]


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) -> (out, in // group, group); the caller has checked divisibility."""
    out, inp = w.shape
    return w.reshape(out, inp // group, group)


def _fit_range(wg: torch.Tensor, fmt: Format, ratio: float = 1.0):
    """Scale and zero point per group for ``wg`` (..., g), shrunk by ``ratio``."""
    if fmt.symmetric:
        if fmt.bits == 8:
            amax = wg.abs().amax(dim=-1) * ratio
            scale = amax / 127.0
        else:
            # The signed extreme maps to qmin exactly (ORT quant_slice_symmetric).
            idx = wg.abs().argmax(dim=-1, keepdim=True)
            a = wg.gather(-1, idx).squeeze(-1) * ratio
            scale = a / float(fmt.qmin)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, None
    xmin = wg.amin(dim=-1).clamp(max=0) * ratio
    xmax = wg.amax(dim=-1).clamp(min=0) * ratio
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both0, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / fmt.qmax
    zero = torch.round(-xmin / scale).clamp(0, fmt.qmax)
    return scale, zero


def quantize_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   fmt: Format) -> torch.Tensor:
    """Integer codes (same shape as ``wg``, int32) for ``wg`` (..., g) with per-group params."""
    q = torch.round(wg / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    return q.clamp(fmt.qmin, fmt.qmax).to(torch.int32)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float weights (..., g) from codes and per-group params (float32 arithmetic)."""
    q = q.to(torch.float32)
    if zero is not None:
        q = q - zero.to(torch.float32).unsqueeze(-1)
    return q * scale.to(torch.float32).unsqueeze(-1)


def fit_group_params(wg: torch.Tensor, fmt: Format, clip: ClipSearch | None = None):
    """Scale (float32) and zero point (float32 integers, or None) per group of ``wg`` (..., g).

    With ``clip``, every group independently takes the shrink ratio whose quantised values have
    the smallest squared error against the group (ties keep the larger ratio).
    """
    wg = wg.to(torch.float32)
    scale, zero = _fit_range(wg, fmt)
    if clip is None:
        return scale, zero
    best = _group_err(wg, scale, zero, fmt)
    for ratio in clip.ratios()[1:]:
        s, z = _fit_range(wg, fmt, ratio)
        err = _group_err(wg, s, z, fmt)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def _group_err(wg, scale, zero, fmt):
    deq = dequantize_codes(quantize_codes(wg, scale, zero, fmt), scale, zero)
    return (deq - wg).pow(2).sum(dim=-1)


def zero_code(zero: torch.Tensor | None, shape, device=None) -> torch.Tensor:
    """The code that dequantises to exactly 0 for each group (for keeping pruned weights zero)."""
    if zero is None:
        return torch.zeros(shape, dtype=torch.int32, device=device)
    return zero.to(torch.int32)


BITS = (2, 3, 4, 5, 6, 7, 8)  # the supported integer widths
FORMATS = tuple(f"int{b}" for b in BITS)


# int4 packing lives with the custom ops that read it (backends/ops/quant.py).
from surgery.backends.ops.quant import pack_int4, unpack_int4  # noqa: E402,F401
