"""Triton StableMax / log-StableMax, forward and backward (spec ops.md §3.5).

Rows that fit on chip (``n <= max_fused``) are read once and written once: one program per row
holds the whole row. Longer rows use two passes over tiles: pass 1 sums s(x), pass 2 writes.
StableMax needs no running max (it is not shift-invariant), so the two-pass form is exact.
Padded lanes contribute exactly 0 (a select, never -inf arithmetic). Math in float32.

The two-pass forward is persistent: a grid of a few programs per SM walks the rows, so the rows
in flight (programs x row bytes) fit in L2 and pass 2 re-reads them from L2, not DRAM. Pass 1
loads with ``evict_last``, pass 2 with ``evict_first``: DRAM sees one read and one write, as in
the fused path (measured on an H100: 59 % -> see docs/bench/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surgery.backends.triton.common import as_rows, from_rows

# Chosen on an H100 with benchmarks/kernels_tune.py (docs/bench/kernels.md has the numbers).
MAX_FUSED = 32768  # longest row kept whole in registers (fp32: 128 KB, one program per SM)
FUSED_WARPS_LONG = 32  # fused path, rows above 8192: 1024 threads keep <= 32 values each
TILE = 8192  # tile of the two-pass path
PROGRAMS_PER_SM = 2  # two-pass forward: resident programs per SM (rows in flight, see above)
TWO_PASS_WARPS = 16
TWO_PASS_STAGES = 1  # software pipelining of the tile loads (1: none; 2-3 measured no faster)


@triton.jit
def _s_terms(x, mask):
    # s(x), log s(x) and s'(x) with padded lanes set to 0 (s, s') and 0 (log s).
    neg = x < 0
    inv = 1.0 / (1.0 - x)
    s = tl.where(mask, tl.where(neg, inv, x + 1.0), 0.0)
    ds = tl.where(mask, tl.where(neg, inv * inv, 1.0), 0.0)
    log1p_abs = tl.log(1.0 + tl.abs(x))  # log s(x) = +-log(1 + |x|): one log, not two
    logs = tl.where(neg, -log1p_abs, log1p_abs)
    return s, logs, ds


@triton.jit
def _fwd_fused(x_ptr, y_ptr, n, sx, sy, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    s, logs, _ = _s_terms(x, mask)
    total = tl.sum(s, axis=0)
    if LOG:
        y = logs - tl.log(total)
    else:
        y = s * (1.0 / total)
    tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_two_pass(x_ptr, y_ptr, rows, n, sx, sy, LOG: tl.constexpr, BLOCK: tl.constexpr,
                  STAGES: tl.constexpr):
    for r in range(tl.program_id(0), rows, tl.num_programs(0)):  # persistent: see the docstring
        row = tl.cast(r, tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in tl.range(0, n, BLOCK, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            s, _, _ = _s_terms(x, mask)
            acc += s
        total = tl.sum(acc, axis=0)
        log_total = tl.log(total)
        inv_total = 1.0 / total
        for start in tl.range(0, n, BLOCK, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            s, logs, _ = _s_terms(x, mask)
            if LOG:
                y = logs - log_total
            else:
                y = s * inv_total
            tl.store(y_ptr + row * sy + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad(x, g, s, ds, total, gsum, gs_sum, LOG: tl.constexpr):
    # log:  dx = g / (1 + |x|) - sum(g) * s' / S ;  plain: dx = s' / S * (g - sum(g * s) / S)
    if LOG:
        return g / (1.0 + tl.abs(x)) - gsum * ds / total
    else:
        return ds / total * (g - gs_sum / total)


@triton.jit
def _bwd_fused(x_ptr, g_ptr, dx_ptr, n, sx, sg, sd, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
    s, _, ds = _s_terms(x, mask)
    total = tl.sum(s, axis=0)
    gsum = tl.sum(g, axis=0)
    gs_sum = tl.sum(g * s, axis=0)
    dx = _grad(x, g, s, ds, total, gsum, gs_sum, LOG)
    tl.store(dx_ptr + row * sd + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_two_pass(x_ptr, g_ptr, dx_ptr, n, sx, sg, sd, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gs = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
        s, _, _ = _s_terms(x, mask)
        acc_s += s
        acc_g += g
        acc_gs += g * s
    total = tl.sum(acc_s, axis=0)
    gsum = tl.sum(acc_g, axis=0)
    gs_sum = tl.sum(acc_gs, axis=0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
        s, _, ds = _s_terms(x, mask)
        dx = _grad(x, g, s, ds, total, gsum, gs_sum, LOG)
        tl.store(dx_ptr + row * sd + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else FUSED_WARPS_LONG


def _persistent_programs(rows: int, device: torch.device) -> int:
    """Programs for the two-pass path: PROGRAMS_PER_SM per SM, so the rows in flight stay in L2."""
    if device.type != "cuda":
        return rows
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rows, sms * PROGRAMS_PER_SM))


def stablemax_forward(x: torch.Tensor, dim: int = -1, log: bool = False,
                      max_fused: int = MAX_FUSED, tile: int = TILE,
                      programs: int | None = None) -> torch.Tensor:
    """(log-)StableMax over ``dim`` with the Triton kernels (``programs``: two-pass grid size)."""
    rows, shape, d = as_rows(x, dim)
    n = rows.shape[1]
    out = torch.empty_like(rows)
    if rows.shape[0] and n:
        if n <= max_fused:
            block = triton.next_power_of_2(n)
            _fwd_fused[(rows.shape[0],)](rows, out, n, rows.stride(0), out.stride(0), LOG=log,
                                         BLOCK=block, num_warps=_warps(block))
        else:
            grid = (programs or _persistent_programs(rows.shape[0], rows.device),)
            _fwd_two_pass[grid](rows, out, rows.shape[0], n, rows.stride(0), out.stride(0),
                                LOG=log, BLOCK=tile, STAGES=TWO_PASS_STAGES,
                                num_warps=TWO_PASS_WARPS)
    return from_rows(out, shape, d)


def stablemax_backward(x: torch.Tensor, grad: torch.Tensor, dim: int = -1, log: bool = False,
                       max_fused: int = MAX_FUSED, tile: int = TILE) -> torch.Tensor:
    """Gradient of (log-)StableMax w.r.t. x with the Triton kernels."""
    rows, shape, d = as_rows(x, dim)
    grows, _, _ = as_rows(grad.to(x.dtype), dim)
    n = rows.shape[1]
    out = torch.empty_like(rows)
    if rows.shape[0] and n:
        kernel, block = ((_bwd_fused, triton.next_power_of_2(n)) if n <= max_fused
                         else (_bwd_two_pass, tile))
        kernel[(rows.shape[0],)](rows, grows, out, n, rows.stride(0), grows.stride(0),
                                 out.stride(0), LOG=log, BLOCK=block, num_warps=_warps(block))
    return from_rows(out, shape, d)
