"""Length-scaled softplus attention (LSSA) and its re-weighted form (LSSAR) as one custom op.

Spec: ops.md §2. Per head, with ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``
(grouped-query attention: query head h reads kv head ``h // (H // Hkv)``)::

    visible_ij = (j <= i + Lk - Lq if causal) and key_mask[b, j]
    N_i        = number of visible keys of query i   (absolute count: KV-cache safe)
    Z_ij       = log(D) * log(N_i) * <q_i/|q_i|, k_j/|k_j|>
    a_ij       = softplus(Z_ij) where visible, else exactly 0 (a select, never 0 * -inf)
    A_ij       = a_ij / (sum_j a_ij + eps)                         LSSA: out = A @ v
    LSSAR (power p > 0):
    x_ij       = N_i * A_ij - O_i,  O_i = 0 if N_i <= 3 else 1
    R_ij       = (relu(x_ij) / max_j relu(x_ij)) ** p,  R_ij /= sum_j R_ij   out = R @ v

Dividing by the row max before the power is the spec's overflow fix (``(N A - 1)^15`` overflows
fp32 once a row concentrates); it is identical after the normalisation. A row whose x are all
<= 0 falls back to its LSSA row (``fallback_on_empty=True``) or gives zeros (the reference code's
behaviour). A row with no visible key gives zeros. Norms use ``F.normalize`` (|q| clamped at
1e-12). Math in float32 (float64 stays float64); the result has q's dtype.

The default implementation is this plain-PyTorch reference (the CPU path and the test oracle);
``surgery.backends.triton`` registers a tiled Triton forward for CUDA. Backward re-runs the
reference under autograd (no fused backward kernel yet).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from surgery.backends.ops.registry import KERNEL_DTYPES, Lazy, Op, register_op


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    hkv = t.shape[1]
    if heads % hkv:
        raise ValueError(f"query heads {heads} are not a multiple of key/value heads {hkv}")
    return t.repeat_interleave(heads // hkv, dim=1)


def visibility(b: int, lq: int, lk: int, causal: bool, key_mask: torch.Tensor | None,
               device) -> torch.Tensor:
    """(B or 1, 1, Lq, Lk) bool: which keys each query may read."""
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        vis = torch.tril(vis, diagonal=lk - lq)
    vis = vis[None, None]
    if key_mask is not None:
        vis = vis & key_mask.to(torch.bool)[:, None, None, :]
    return vis


def softplus_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_mask: torch.Tensor | None = None, causal: bool = True,
                                 power: float = 0.0, eps: float = 1e-8,
                                 fallback_on_empty: bool = True) -> torch.Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = F.normalize(q.to(cd), dim=-1)
    kf = F.normalize(_expand_kv(k, h).to(cd), dim=-1)
    vf = _expand_kv(v, h).to(cd)
    vis = visibility(b, lq, lk, causal, key_mask, q.device)
    n = vis.sum(-1, keepdim=True).to(cd)  # (B|1, 1, Lq, 1)
    scale = math.log(d) * torch.log(n.clamp(min=1.0))
    z = scale * (qf @ kf.transpose(-1, -2))
    a = torch.where(vis, F.softplus(z), torch.zeros_like(z))
    attn = a / (a.sum(-1, keepdim=True) + eps)
    if power > 0:
        offset = (n > 3).to(cd)
        x = torch.where(vis, n * attn - offset, torch.zeros_like(attn)).clamp(min=0.0)
        m = x.amax(-1, keepdim=True)
        tiny = torch.finfo(cd).tiny
        r = (x / m.clamp(min=tiny)) ** power
        r = r / r.sum(-1, keepdim=True).clamp(min=tiny)
        empty = m <= 0
        attn = torch.where(empty, attn if fallback_on_empty else torch.zeros_like(attn), r)
    return (attn @ vf).to(q.dtype)


@torch.library.custom_op("surgery::softplus_attention", mutates_args=())
def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None, causal: bool, power: float, eps: float,
                       fallback_on_empty: bool) -> torch.Tensor:
    return softplus_attention_reference(q, k, v, key_mask, causal, power, eps, fallback_on_empty)


@softplus_attention.register_fake
def _(q, k, v, key_mask, causal, power, eps, fallback_on_empty):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx, inputs, output):
    q, k, v, key_mask, causal, power, eps, fallback = inputs
    ctx.args = (causal, power, eps, fallback)
    ctx.save_for_backward(q, k, v, key_mask)


def _backward(ctx, grad):
    q, k, v, key_mask = ctx.saved_tensors
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = softplus_attention_reference(qq, kk, vv, key_mask, *ctx.args)
        gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad)
    return gq, gk, gv, None, None, None, None, None


softplus_attention.register_autograd(_backward, setup_context=_setup)


MAX_HEAD_DIM = 256  # the kernel keeps a head in registers; larger heads take the reference


def _kernel_covers(q, k, v, *rest) -> bool:
    return (q.dtype in KERNEL_DTYPES and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
            and k.dtype == q.dtype and v.dtype == q.dtype)


register_op(Op("softplus_attention", reference=softplus_attention_reference,
               kernel=Lazy("surgery.backends.triton.softplus_attention:softplus_attention_forward"),
               covers=_kernel_covers, onnx="surgery.backends.onnx.translations_kernels:softplus_attention",
               sites=(("attention", "softplus"),)))
