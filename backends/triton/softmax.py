"""Triton softmax baselines (spec ops.md §3.2-3.4), compared against StableMax in benchmarks.

- fused:    whole row on chip, subtract max, exp2, sum, divide (1 read + 1 write);
- online:   per-lane running max m and rescaled sum d over tiles (Milakov & Gimelshein), lanes
            merged at the end, then a normalising pass (2 reads + 1 write);
- two_pass: Dukhan & Ablavatski's extended-exponent sum: exp(x) = m * 2^n with
            n = round(x log2 e), accumulated as (mantissa, max exponent) pairs, so no max pass
            and no overflow; pass 2 rescales by an exact power of two (2 reads + 1 write).
            On GPU ``exp`` of the reduced argument is the hardware exp2, not XNNPACK's P5.

All match ``torch.softmax`` including NaN for a fully ``-inf`` row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surgery.backends.triton.common import as_rows, from_rows

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_FUSED = 16384
TILE = 2048


@triton.jit
def _fused(x_ptr, y_ptr, n, sx, sy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    e = tl.exp2((x - m) * 1.4426950408889634)
    e = tl.where(mask, e, 0.0)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _online(x_ptr, y_ptr, n, sx, sy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * sx + offs, mask=offs < n, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        live = m_new > -float("inf")  # a lane that has seen only -inf keeps d = 0
        alpha = tl.where(live, tl.exp2((m - m_new) * 1.4426950408889634), 1.0)
        p = tl.where(live, tl.exp2((x - m_new) * 1.4426950408889634), 0.0)
        d = d * alpha + p
        m = m_new
    m_row = tl.max(m, axis=0)
    d_row = tl.sum(tl.where(m > -float("inf"), d * tl.exp2((m - m_row) * 1.4426950408889634),
                            0.0), axis=0)
    inv = 1.0 / d_row
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * sx + offs, mask=mask, other=-float("inf")).to(tl.float32)
        y = tl.exp2((x - m_row) * 1.4426950408889634) * inv
        tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ext_exp(x):
    # exp(x) = mant * 2^expo with expo = round(x log2 e) and mant = exp(x - expo ln 2) in
    # [2^-1/2, 2^1/2]; -inf gives (0, -inf).
    expo = tl.floor(x * 1.4426950408889634 + 0.5)
    finite = x > -float("inf")
    mant = tl.where(finite, tl.exp(x - expo * 0.6931471805599453), 0.0)
    return mant, expo


@triton.jit
def _two_pass(x_ptr, y_ptr, n, sx, sy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    acc_e = tl.full([BLOCK], -float("inf"), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * sx + offs, mask=offs < n, other=-float("inf")).to(tl.float32)
        mant, expo = _ext_exp(x)
        e_new = tl.maximum(acc_e, expo)
        live = e_new > -float("inf")
        keep = tl.where(live & (acc_e > -float("inf")), tl.exp2(acc_e - e_new), 0.0)
        add = tl.where(live & (expo > -float("inf")), mant * tl.exp2(expo - e_new), 0.0)
        acc_m = acc_m * keep + add
        acc_e = e_new
    e_sum = tl.max(acc_e, axis=0)
    m_sum = tl.sum(tl.where(acc_e > -float("inf"), acc_m * tl.exp2(acc_e - e_sum), 0.0), axis=0)
    inv = 1.0 / m_sum
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * sx + offs, mask=mask, other=-float("inf")).to(tl.float32)
        mant, expo = _ext_exp(x)
        # a fully -inf row has e_sum = -inf: exp2(-inf - -inf) is NaN, as torch.softmax gives
        y = mant * inv * tl.exp2(expo - e_sum)
        tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def softmax_forward(x: torch.Tensor, dim: int = -1, algorithm: str = "online",
                    max_fused: int = MAX_FUSED, tile: int = TILE) -> torch.Tensor:
    rows, shape, d = as_rows(x, dim)
    n = rows.shape[1]
    out = torch.empty_like(rows)
    if rows.shape[0] and n:
        grid = (rows.shape[0],)
        args = (rows, out, n, rows.stride(0), out.stride(0))
        if algorithm == "fused" and n <= max_fused:
            block = triton.next_power_of_2(n)
            _fused[grid](*args, BLOCK=block, num_warps=4 if block <= 2048 else 8)
        elif algorithm in ("fused", "online"):  # fused falls back to online for long rows
            _online[grid](*args, BLOCK=tile, num_warps=8)
        elif algorithm == "two_pass":
            _two_pass[grid](*args, BLOCK=tile, num_warps=8)
        else:
            raise ValueError(f"unknown softmax algorithm {algorithm!r}")
    return from_rows(out, shape, d)
