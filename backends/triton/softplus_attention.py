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


@triton.jit
def _logits(q, inv_nq, k_ptrs, k_valid, sk_d, offs_d, D: tl.constexpr, IEEE: tl.constexpr):
    k = tl.load(k_ptrs, mask=k_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    kf = k.to(tl.float32)
    inv_nk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), 1e-12)
    if IEEE:
        dots = tl.dot(q.to(tl.float32), tl.trans(kf), input_precision="ieee")
    else:
        dots = tl.dot(q, tl.trans(k))
    return dots * inv_nq[:, None] * inv_nk[None, :]


@triton.jit
def _softplus(z):
    # log(1 + e^z) without overflow: max(z, 0) + log(1 + e^-|z|)
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _lssa_fwd(q_ptr, k_ptr, v_ptr, o_ptr, nvis_ptr, km_ptr,
              sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, skm_b,
              H, GROUP, LQ, LK, log_d, power, eps,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr, FALLBACK: tl.constexpr,
              IEEE: tl.constexpr):
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
    scale = log_d * tl.log(tl.maximum(n_vis, 1.0))
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M + LK - LQ)
    shift = LK - LQ

    acc_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if REWEIGHT:
        # pass 1: S_i = sum_j a_ij
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k_valid = offs_n < LK
            vis = row_ok[:, None] & k_valid[None, :]
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + shift)
            if HAS_MASK:
                km = tl.load(km_ptr + b * skm_b + offs_n, mask=k_valid, other=0)
                vis = vis & (km[None, :] != 0)
            z = _logits(q, inv_nq, k_base + offs_n[:, None] * sk_n + offs_d[None, :], k_valid,
                        sk_n, offs_d, D, IEEE) * scale[:, None]
            acc_s += tl.sum(tl.where(vis, _softplus(z), 0.0), axis=1)
        inv_s = 1.0 / (acc_s + eps)
        offset = tl.where(n_vis > 3.0, 1.0, 0.0)
        m_run = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_r = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_rv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_valid = offs_n < LK
        vis = row_ok[:, None] & k_valid[None, :]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + shift)
        if HAS_MASK:
            km = tl.load(km_ptr + b * skm_b + offs_n, mask=k_valid, other=0)
            vis = vis & (km[None, :] != 0)
        z = _logits(q, inv_nq, k_base + offs_n[:, None] * sk_n + offs_d[None, :], k_valid,
                    sk_n, offs_d, D, IEEE) * scale[:, None]
        a = tl.where(vis, _softplus(z), 0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_dv[None, :],
                    mask=k_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc_o += tl.dot(a, v.to(tl.float32), input_precision="ieee")
        else:
            acc_o += tl.dot(a.to(v.dtype), v)
        if REWEIGHT:
            x = tl.where(vis, n_vis[:, None] * a * inv_s[:, None] - offset[:, None], 0.0)
            r = tl.maximum(x, 0.0)
            m_new = tl.maximum(m_run, tl.max(r, axis=1))
            pos = m_new > 0.0
            safe_m = tl.where(pos, m_new, 1.0)
            # (m_old / m_new)^p, 0 when nothing was positive before
            ratio_old = m_run / safe_m
            keep = tl.where(ratio_old > 0.0, tl.exp2(power * tl.log2(ratio_old)), 0.0)
            ratio = r / safe_m[:, None]
            w = tl.where(ratio > 0.0, tl.exp2(power * tl.log2(ratio)), 0.0)
            acc_r = acc_r * keep + tl.sum(w, axis=1)
            if IEEE:
                pv = tl.dot(w, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(w.to(v.dtype), v)
            acc_rv = acc_rv * keep[:, None] + pv
            m_run = m_new
        else:
            acc_s += tl.sum(a, axis=1)

    lssa = acc_o / (acc_s + eps)[:, None]
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
                               fallback_on_empty: bool = True, block_m: int = 64,
                               block_n: int = 64) -> torch.Tensor:
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
    grid = (triton.cdiv(lq, block_m), b * h)
    _lssa_fwd[grid](
        q, k, v, out, n_vis, km,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        km.stride(0) if key_mask is not None else 0,
        h, h // hkv, lq, lk, math.log(d), float(power), float(eps),
        D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_MASK=key_mask is not None, REWEIGHT=power > 0,
        FALLBACK=fallback_on_empty, IEEE=fp32_dots(q.dtype),
        num_warps=4, num_stages=2)
    return out

