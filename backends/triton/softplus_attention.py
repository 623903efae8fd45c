"""Triton forward of length-scaled softplus attention (LSSA / LSSAR), flash-style tiles.

One program owns BLOCK_M queries of one (batch, head) and streams key/value tiles (spec ops.md
§2.4). Cosine logits come from a dot of the raw q, k tiles (fp16/bf16 inputs stay exact on the
tensor cores, fp32 accumulation) multiplied by the reciprocal norms. Masking is a select, so row 1
(scale log 1 = 0) and fully masked rows stay finite.

- LSSA (power == 0): one pass, no running max: accumulate sum(a) and sum(a v), divide at the end.
- LSSAR (power > 0): pass 1 sums a per row; pass 2 forms x = N a / (S + eps) - O, keeps a running
  max m of relu(x) and accumulates (relu(x)/m)^p and its product with v, rescaling both by
  (m_old/m_new)^p when the max grows. The LSSA accumulator rides along for the empty-row fallback.

Causal masking is bottom-right aligned (query i sees keys j <= i + Lk - Lq, the KV-cache case); key
tiles past the last visible key are skipped. N_i (visible keys per query) is computed on the host
from the key mask (a cumulative sum) and read by the kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from surgery.backends.triton.common import fp32_dots

# (block_m, block_n, num_warps, num_stages) at head dim <= 64, fp16/bf16, chosen on an H100 with
# benchmarks/kernels_tune.py; LSSAR's second pass carries more state and prefers larger tiles.
CONFIG = {"lssa": (64, 128, 4, 3), "lssar": (128, 128, 8, 4)}


def launch_config(head_dim: int, dtype: torch.dtype, reweight: bool) -> tuple[int, int, int, int]:
    """Tile sizes that fit shared memory: smaller key tiles and fewer stages for wide heads and
    fp32 (whose dots take 4-byte operands)."""
    bm, bn, warps, stages = CONFIG["lssar" if reweight else "lssa"]
    width = head_dim * (2 if dtype == torch.float32 else 1)
    if width > 128:
        return 64, 32, 4, 2
    if width > 64:
        return 64, 64, 4, 2
    return bm, bn, warps, stages


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _softplus2(z2, FAST: tl.constexpr):
    # log2(1 + 2^z2) without overflow: max(z2, 0) + log2(1 + t), t = 2^-|z2| in (0, 1].
    # softplus(z) is LN2 * _softplus2(z * LOG2E); the constant LN2 cancels in the normalisation.
    # log2(1 + t) = t * P(t), P a least-squares fit of log2(1 + t) / t on [0, 1]: one
    # special-function call per score instead of two (that unit runs at 1/8 of the FMA rate).
    # FAST (fp16/bf16 inputs): degree 4, relative error 6.5e-5, far below the inputs' rounding;
    # else degree 6, relative error 1.6e-6.
    t = tl.exp2(-tl.abs(z2))
    if FAST:
        p = 0.058372617 * t - 0.22450235
        p = p * t + 0.44020858
        p = p * t - 0.71663153
        p = p * t + 1.442601
    else:
        p = 0.019927934 * t - 0.094356
        p = p * t + 0.21363184
        p = p * t - 0.33821112
        p = p * t + 0.4774559
        p = p * t - 0.72114044
        p = p * t + 1.4426929
    return tl.maximum(z2, 0.0) + t * p


@triton.jit
def _pow(r, power, POW_INT: tl.constexpr):
    # r ** power for r >= 0 (0 ** p = 0): by squaring for a small integer power (the default
    # p = 15 costs six multiplies instead of two special-function calls), else exp2(p log2 r).
    if POW_INT > 0:
        out = tl.full(r.shape, 1.0, tl.float32)
        base = r
        for bit in tl.static_range(7):
            if (POW_INT >> bit) & 1:
                out = out * base
            if (POW_INT >> (bit + 1)) > 0:
                base = base * base
        return out
    else:
        return tl.where(r > 0.0, tl.exp2(power * tl.log2(r)), 0.0)


@triton.jit
def _scores(q, row_fac2, k_base, nk_base, offs_n, offs_d, sk_n, LK, D: tl.constexpr,
            EVEN: tl.constexpr, IEEE: tl.constexpr):
    """log2e * scale_i * cos(q_i, k_j) for one key tile (raw dot, then the norms)."""
    if EVEN:
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=offs_d[None, :] < D, other=0.0)
        inv_nk = tl.load(nk_base + offs_n)
    else:
        k_valid = offs_n < LK
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=k_valid[:, None] & (offs_d[None, :] < D), other=0.0)
        inv_nk = tl.load(nk_base + offs_n, mask=k_valid, other=0.0)
    if IEEE:
        dots = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        dots = tl.dot(q, tl.trans(k))
    return dots * row_fac2 * inv_nk[None, :]


@triton.jit
def _visible(offs_m, offs_n, row_ok, LK, shift, km_base, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Which (query, key) pairs of the tile count; None-free: all True when MASKED is off."""
    vis = row_ok[:, None] & (offs_n[None, :] < LK)
    if MASKED:
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + shift)
    if HAS_MASK:
        km = tl.load(km_base + offs_n, mask=offs_n < LK, other=0)
        vis = vis & (km[None, :] != 0)
    return vis


@triton.jit
def _row_sums(acc_s, q, row_fac2, k_base, nk_base, km_base, offs_m, row_ok, offs_d, lo, hi,
              sk_n, LK, shift, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """LSSAR pass 1 over key tiles [lo, hi): S_i += sum_j a_ij (in log2 units)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        z2 = _scores(q, row_fac2, k_base, nk_base, offs_n, offs_d, sk_n, LK, D, not MASKED, IEEE)
        a = _softplus2(z2, not IEEE)
        if MASKED or HAS_MASK:
            a = tl.where(_visible(offs_m, offs_n, row_ok, LK, shift, km_base, MASKED, CAUSAL,
                                  HAS_MASK), a, 0.0)
        acc_s += tl.sum(a, axis=1)
    return acc_s


@triton.jit
def _accumulate(acc_s, acc_o, m_run, acc_r, acc_rv, q, row_fac2, k_base, v_base, nk_base,
                km_base, offs_m, row_ok, offs_d, offs_dv, lo, hi, sk_n, sv_n, LK, shift,
                n_vis2, inv_s2, offset2, power, D: tl.constexpr, DV: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr, FALLBACK: tl.constexpr,
                POW_INT: tl.constexpr, IEEE: tl.constexpr):
    """Key tiles [lo, hi): LSSA sums (sum a, sum a v) and, for LSSAR, the re-weighted ones."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        z2 = _scores(q, row_fac2, k_base, nk_base, offs_n, offs_d, sk_n, LK, D, not MASKED, IEEE)
        a = _softplus2(z2, not IEEE)
        if MASKED or HAS_MASK:
            vis = _visible(offs_m, offs_n, row_ok, LK, shift, km_base, MASKED, CAUSAL, HAS_MASK)
            a = tl.where(vis, a, 0.0)
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * sv_n + offs_dv[None, :],
                        mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * sv_n + offs_dv[None, :],
                        mask=offs_dv[None, :] < DV, other=0.0)
        if (not REWEIGHT) or FALLBACK:
            if IEEE:
                acc_o += tl.dot(a, v.to(tl.float32), input_precision="ieee")
            else:
                acc_o += tl.dot(a.to(v.dtype), v)
        if REWEIGHT:
            # x = N a / (S + eps) - O (a and S both in log2 units: the LN2 factors cancel)
            x = n_vis2 * a * inv_s2 - offset2
            if MASKED or HAS_MASK:
                x = tl.where(vis, x, 0.0)
            r = tl.maximum(x, 0.0)
            m_new = tl.maximum(m_run, tl.max(r, axis=1))
            inv_m = 1.0 / tl.where(m_new > 0.0, m_new, 1.0)
            keep = _pow(m_run * inv_m, power, POW_INT)  # (m_old / m_new)^p, 0 before any r > 0
            w = _pow(r * inv_m[:, None], power, POW_INT)
            acc_r = acc_r * keep + tl.sum(w, axis=1)
            if IEEE:
                pv = tl.dot(w, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(w.to(v.dtype), v)
            acc_rv = acc_rv * keep[:, None] + pv
            m_run = m_new
        else:
            acc_s += tl.sum(a, axis=1)
    return acc_s, acc_o, m_run, acc_r, acc_rv


@triton.jit
def _lssa_fwd(q_ptr, k_ptr, v_ptr, o_ptr, nvis_ptr, km_ptr, nk_ptr,
              sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, skm_b,
              snk_b, snk_h, H, GROUP, LQ, LK, log_d, power, eps,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr, FALLBACK: tl.constexpr,
              POW_INT: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < LQ
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qf = q.to(tl.float32)
    inv_nq = 1.0 / tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), 1e-12)
    n_vis = tl.load(nvis_ptr + b * LQ + offs_m, mask=row_ok, other=0.0)
    # per-row factors as (BLOCK_M, 1) columns, formed once outside the key loops
    row_fac2 = (inv_nq * log_d * tl.log(tl.maximum(n_vis, 1.0)) * 1.4426950408889634)[:, None]
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    nk_base = nk_ptr + b * snk_b + hk * snk_h
    km_base = km_ptr + b * skm_b
    shift = LK - LQ
    # Key tiles [0, full) are entirely visible to every query of the block (no causal select);
    # tiles [full, hi) straddle the diagonal or the end of the keys.
    hi = LK
    full = (LK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M + shift)
        full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + shift + 1, 0) // BLOCK_N * BLOCK_N)

    acc_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_rv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_vis2 = n_vis[:, None]
    inv_s2 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    offset2 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    eps2 = eps * 1.4426950408889634  # eps in the log2 units of the sums
    if REWEIGHT:  # pass 1: S_i = sum_j a_ij
        acc_s = _row_sums(acc_s, q, row_fac2, k_base, nk_base, km_base, offs_m, row_ok, offs_d,
                          0, full, sk_n, LK, shift, D, BLOCK_N, False, CAUSAL, HAS_MASK, IEEE)
        acc_s = _row_sums(acc_s, q, row_fac2, k_base, nk_base, km_base, offs_m, row_ok, offs_d,
                          full, hi, sk_n, LK, shift, D, BLOCK_N, True, CAUSAL, HAS_MASK, IEEE)
        inv_s2 = (1.0 / (acc_s + eps2))[:, None]
        offset2 = tl.where(n_vis > 3.0, 1.0, 0.0)[:, None]
    acc_s, acc_o, m_run, acc_r, acc_rv = _accumulate(
        acc_s, acc_o, m_run, acc_r, acc_rv, q, row_fac2, k_base, v_base, nk_base, km_base,
        offs_m, row_ok, offs_d, offs_dv, 0, full, sk_n, sv_n, LK, shift, n_vis2, inv_s2, offset2,
        power, D, DV, BLOCK_N, False, CAUSAL, HAS_MASK, REWEIGHT, FALLBACK, POW_INT, IEEE)
    acc_s, acc_o, m_run, acc_r, acc_rv = _accumulate(
        acc_s, acc_o, m_run, acc_r, acc_rv, q, row_fac2, k_base, v_base, nk_base, km_base,
        offs_m, row_ok, offs_d, offs_dv, full, hi, sk_n, sv_n, LK, shift, n_vis2, inv_s2, offset2,
        power, D, DV, BLOCK_N, True, CAUSAL, HAS_MASK, REWEIGHT, FALLBACK, POW_INT, IEEE)

    lssa = acc_o / (acc_s + eps2)[:, None]
    if REWEIGHT:
        rew = acc_rv / tl.where(acc_r > 0.0, acc_r, 1.0)[:, None]
        if FALLBACK:
            out = tl.where((m_run > 0.0)[:, None], rew, lssa)
        else:
            out = tl.where((m_run > 0.0)[:, None], rew, 0.0)
    else:
        out = lssa
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


def visible_counts(b: int, lq: int, lk: int, causal: bool, key_mask: torch.Tensor | None,
                   device) -> torch.Tensor:
    """(B, Lq) float32: visible keys per query, from a cumulative sum of the key mask."""
    if key_mask is None:
        keys = torch.ones(1, lk, device=device)
    else:
        keys = key_mask.to(torch.float32)
    csum = torch.cumsum(keys, dim=-1)  # (B|1, Lk)
    if causal:
        last = (torch.arange(lq, device=device) + lk - lq).clamp(max=lk - 1)
        n = torch.where(last >= 0, csum[:, last.clamp(min=0)], torch.zeros((), device=device))
    else:
        n = csum[:, -1:].expand(-1, lq)
    return n.expand(b, lq).contiguous()


def softplus_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               key_mask: torch.Tensor | None = None, causal: bool = True,
                               power: float = 0.0, eps: float = 1e-8,
                               fallback_on_empty: bool = True, block_m: int | None = None,
                               block_n: int | None = None, num_warps: int | None = None,
                               num_stages: int | None = None) -> torch.Tensor:
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if h % hkv:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {hkv}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, h, lq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    n_vis = visible_counts(b, lq, lk, causal, key_mask, q.device)
    if key_mask is not None:
        km = key_mask.to(torch.int8).expand(b, lk).contiguous()
    else:
        km = n_vis  # never read (HAS_MASK=False); any pointer will do
    # 1 / ||k_j||, once per key (not once per query block), read by the kernel per tile
    inv_nk = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).clamp_min_(1e-12)
    inv_nk = inv_nk.reciprocal_()
    pow_int = int(power) if float(power).is_integer() and 0 < power < 128 else 0
    cfg = launch_config(max(d, dv), q.dtype, power > 0)
    block_m, block_n = block_m or cfg[0], block_n or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    grid = (triton.cdiv(lq, block_m), b * h)
    _lssa_fwd[grid](
        q, k, v, out, n_vis, km, inv_nk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        km.stride(0) if key_mask is not None else 0, inv_nk.stride(0), inv_nk.stride(1),
        h, h // hkv, lq, lk, math.log(d), float(power), float(eps),
        D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_MASK=key_mask is not None, REWEIGHT=power > 0,
        FALLBACK=fallback_on_empty, POW_INT=pow_int, IEEE=fp32_dots(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out

