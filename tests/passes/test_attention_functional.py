"""LSSA / LSSAR / StableMax attention: spec golden checks (ops.md §2, §10) on the functional API."""

import math

import torch
import torch.nn.functional as F

from surgery.passes.attention import functional as AF


def _qkv(b=2, h=3, L=9, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, L, d, generator=g, dtype=dtype) for _ in range(3))


def _reference_lssa(q, k, eps=1e-8):
    """Straight from the paper's formula with an explicit causal 0/1 mask (no shortcuts)."""
    L, D = q.shape[-2], q.shape[-1]
    qh = q / q.norm(dim=-1, keepdim=True)
    kh = k / k.norm(dim=-1, keepdim=True)
    n = torch.arange(1, L + 1, dtype=q.dtype)[:, None]
    z = math.log(D) * torch.log(n) * (qh @ kh.transpose(-2, -1))
    a = F.softplus(z) * torch.ones(L, L, dtype=q.dtype).tril()
    return a / (a.sum(-1, keepdim=True) + eps)


def test_lssa_matches_formula_rows_sum_to_one_and_first_query_attends_itself():
    q, k, _ = _qkv()
    vis = AF.causal_visible(9, 9)
    w = AF.lssa_weights(q, k.transpose(-2, -1), vis)
    assert torch.allclose(w, _reference_lssa(q, k), atol=1e-12)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64), atol=1e-7)
    assert (w[..., 0, 0] == w[..., 0, 0]).all() and torch.allclose(w[..., 0, 0], torch.ones(2, 3, dtype=torch.float64))
    assert (w[..., 0, 1:] == 0).all()
    assert (w.masked_select(~vis.expand_as(w)) == 0).all()


def test_lssa_first_row_is_exactly_one_in_float32():
    q, k, _ = _qkv(dtype=torch.float32)
    w = AF.lssa_weights(q, k.transpose(-2, -1), AF.causal_visible(9, 9))
    assert (w[..., 0, 0] == 1.0).all()


def test_max_logit_golden_value():
    # one query seeing N = 8192 keys of head dim 64, all identical: Z = log(64) * log(8192) = 37.48
    q = torch.ones(1, 1, 1, 64)
    k = torch.ones(1, 1, 8192, 64)
    z_max = math.log(64) * math.log(8192)
    assert abs(z_max - 37.48) < 0.01
    w = AF.lssa_weights(q, k.transpose(-2, -1))
    assert torch.isfinite(w).all() and torch.allclose(w, torch.full_like(w, 1 / 8192))
    assert abs(float(F.softplus(torch.tensor(z_max))) - 37.48) < 0.01  # bounded logits, no max-shift


def _reference_lssar(a, p, eps=1e-8):
    L = a.shape[-1]
    n = torch.arange(1, L + 1, dtype=a.dtype)[:, None]
    o = (torch.arange(1, L + 1) > 3).to(a.dtype)[:, None]
    r = torch.relu(n * a - o) ** p
    return r / (r.sum(-1, keepdim=True) + eps)


def test_lssar_matches_reference_at_short_length():
    q, k, _ = _qkv(L=12)
    vis = AF.causal_visible(12, 12)
    a = AF.lssa_weights(q, k.transpose(-2, -1), vis)
    ref = _reference_lssar(a, 3.0)
    got = AF.lssar_weights(a, vis, p=3.0, fallback_on_empty=False)
    assert torch.allclose(got, ref, atol=1e-9)
    assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-7)
    assert (got.masked_select(~vis.expand_as(got)) == 0).all()


def test_lssar_does_not_overflow_at_long_length():
    # One query seeing N = 2048 keys; it matches the last key and opposes the others, so its row
    # concentrates: x = N*A - 1 ~ 2047 and x^15 ~ 5e49 overflows fp32 in the naive formula.
    n_keys = 2048
    e = torch.randn(64, generator=torch.Generator().manual_seed(0))
    q = e.view(1, 1, 1, 64)
    k = (-e).repeat(1, 1, n_keys, 1)
    k[..., -1, :] = e
    a = AF.lssa_weights(q, k.transpose(-2, -1))
    raw = torch.relu(n_keys * a - 1) ** 15
    assert not torch.isfinite(raw).all()
    w = AF.lssar_weights(a, None, p=15.0)
    assert torch.isfinite(w).all()
    assert torch.allclose(w.sum(-1), torch.ones(1, 1, 1), atol=1e-6)
    assert float(w[..., -1]) > 0.999
    # and on a softer random long row the rescaled fp32 result equals the unscaled fp64 formula
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 64, generator=g), torch.randn(1, 1, n_keys, 64, generator=g)
    a = AF.lssa_weights(q, k.transpose(-2, -1))
    r = torch.relu(n_keys * a.double() - 1) ** 15
    ref = r / (r.sum(-1, keepdim=True) + 1e-8)
    assert torch.allclose(AF.lssar_weights(a, None, p=15.0).double(), ref, atol=1e-5)


def test_lssar_degenerate_row_fallback_and_reference_mode():
    a = torch.full((1, 6), 1 / 6)  # a uniform row seeing 6 keys: nothing above average
    vis = torch.ones(1, 6, dtype=torch.bool)
    assert torch.equal(AF.lssar_weights(a, vis, p=15.0), a)
    assert (AF.lssar_weights(a, vis, p=15.0, fallback_on_empty=False) == 0).all()


def test_stablemax_weights_masks_exactly_and_handles_empty_rows():
    logits = torch.randn(2, 5, 5)
    vis = AF.causal_visible(5, 5)
    vis_rows = vis.clone()
    vis_rows[2] = False  # a fully masked row
    w = AF.stablemax_weights(logits, vis_rows)
    assert (w.masked_select(~vis_rows.expand_as(w)) == 0).all()
    assert (w[:, 2] == 0).all()
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.allclose(w[:, keep].sum(-1), torch.ones(2, 4), atol=1e-6)
    # masked entries never influence the rest, whatever their logit (here +inf and NaN)
    poisoned = logits.masked_fill(~vis, float("inf"))
    assert torch.equal(AF.stablemax_weights(poisoned, vis), AF.stablemax_weights(logits, vis))


def test_stablemax_attention_equals_manual_formula_with_gqa_and_float_mask():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    v = torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[1, :, :, 4:] = torch.finfo(torch.float32).min  # padding of the second sequence
    out = AF.stablemax_attention(q, k, v, mask=mask, is_causal=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    x = q @ kk.transpose(-2, -1) / math.sqrt(8)
    keep = torch.ones(6, 6).tril().bool() & (mask > -1e4)
    sx = torch.where(keep, AF.s(x), 0)
    ref = (sx / sx.sum(-1, keepdim=True)) @ vv
    assert torch.allclose(out, ref, atol=1e-6)


def test_softplus_attention_bool_mask_equals_float_mask():
    q, k, v = _qkv(L=7, dtype=torch.float32)
    keep = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    keep |= torch.eye(7, dtype=torch.bool)
    add = torch.zeros(keep.shape).masked_fill(~keep, -float("inf"))
    a = AF.softplus_attention(q, k, v, mask=keep, reweight=True, p=4.0)
    b = AF.softplus_attention(q, k, v, mask=add, reweight=True, p=4.0)
    assert torch.equal(a, b) and torch.isfinite(a).all()
