"""Plain-PyTorch normalisers for swapped attention (stable public API).

Everything here uses standard ops only (where, reciprocal, log1p, softplus, relu, pow, sum, matmul)
so ONNX export needs no custom translation and the Triton backend can use these functions as the
reference / CPU path of its custom ops (``surgery::stablemax``, ``surgery::softplus_attention``).

Conventions
-----------
* ``visible`` is a boolean tensor broadcastable to the scores ``(..., L, S)``: True where query i
  may attend key j. Masked entries get weight exactly 0 (multiplicative masking), never via -inf
  arithmetic, so no mask value can leak through a normaliser that is not shift-invariant.
* A fully masked row gets all-zero weights (softmax would give NaN or a uniform row).
* Specs: /work/shared/specs/ops.md §1 (StableMax) and §2 (LSSA / LSSAR).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "s", "log_s", "stablemax", "log_stablemax", "stablemax_weights", "lssa_weights",
    "lssar_weights", "softplus_weights", "visible_from_mask", "causal_visible",
    "stablemax_attention", "softplus_attention", "MASK_THRESHOLD",
]

# An additive mask entry at or below this value marks a masked position (covers -inf, finfo.min
# and the -1e4 / -1e9 constants of older code; softmax gives all of these exactly zero weight).
MASK_THRESHOLD = -1e4


def s(x: torch.Tensor) -> torch.Tensor:
    """StableMax element map: x + 1 for x >= 0, 1 / (1 - x) for x < 0 (ops.md §1.1)."""
    neg = x < 0
    # Evaluate each branch on a safe input so the unused branch cannot produce inf/NaN gradients.
    return torch.where(neg, 1.0 / (1.0 - torch.where(neg, x, torch.zeros_like(x))),
                       torch.where(neg, torch.zeros_like(x), x) + 1.0)


def log_s(x: torch.Tensor) -> torch.Tensor:
    """log s(x) = log1p(x) for x >= 0, -log1p(-x) for x < 0 (no division, no overflow)."""
    neg = x < 0
    return torch.where(neg, -torch.log1p(-torch.where(neg, x, torch.zeros_like(x))),
                       torch.log1p(torch.where(neg, torch.zeros_like(x), x)))


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax(x)_i = s(x_i) / sum_j s(x_j). Not shift-invariant: never subtract the row max."""
    sx = s(x)
    return sx / sx.sum(dim=dim, keepdim=True)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log StableMax as log s(x_i) - logsumexp_j log s(x_j): the reference's value without its
    division, and exactly 0 for a single class."""
    ls = log_s(x)
    return ls - torch.logsumexp(ls, dim=dim, keepdim=True)


def _safe_div_rows(w: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    total = w.sum(dim=-1, keepdim=True)
    # An all-zero row (every key masked) stays all zero instead of 0/0.
    return w / torch.where(total > 0, total + eps, torch.ones_like(total))


def stablemax_weights(logits: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights StableMax over the last dim with masked entries exactly 0."""
    if visible is None:
        return stablemax(logits, dim=-1)
    visible = visible.expand_as(logits) if visible.shape != logits.shape else visible
    x = torch.where(visible, logits, torch.zeros_like(logits))
    w = torch.where(visible, s(x), torch.zeros_like(x))
    return _safe_div_rows(w)


def _visible_counts(visible: torch.Tensor | None, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """N_i: number of keys row i may see, shape (..., L, 1), at least 1."""
    if visible is None:
        return torch.full((*shape[:-1], 1), float(shape[-1]), dtype=like.dtype, device=like.device)
    n = visible.expand(shape).sum(dim=-1, keepdim=True).to(like.dtype)
    return n.clamp_min(1.0)


def lssa_weights(q: torch.Tensor, k_t: torch.Tensor, visible: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Length-scaled softplus attention weights (ops.md §2.2).

    q: (..., L, D) queries; k_t: (..., D, S) transposed keys (RoPE already applied, GQA heads
    already repeated). Z = log(D) * log(N_i) * cos(q_i, k_j) (+ finite additive bias),
    A = softplus(Z) * visible, rows l1-normalised with ``eps``. Accumulates in float32 (or
    float64 when given float64) and returns that dtype.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = q.to(acc)
    k_t = k_t.to(acc)
    d = q.shape[-1]
    qh = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    kh = k_t / k_t.norm(dim=-2, keepdim=True).clamp_min(1e-12)
    cos = qh @ kh
    n = _visible_counts(visible, cos.shape, cos)
    z = (math.log(d) * torch.log(n)) * cos
    if bias is not None:
        z = z + bias.to(acc)
    a = F.softplus(z)
    if visible is not None:
        a = torch.where(visible, a, torch.zeros_like(a))  # multiplicative mask, after softplus
    return a / (a.sum(dim=-1, keepdim=True) + eps)


def lssar_weights(a: torch.Tensor, visible: torch.Tensor | None = None, p: float = 15.0,
                  eps: float = 1e-8, offset_rows: int = 3, fallback_on_empty: bool = True) -> torch.Tensor:
    """Re-weighting stage of LSSAR on l1-normalised LSSA weights ``a`` (ops.md §2.3).

    x_ij = N_i * a_ij - O_i with O_i = 0 for rows that see <= ``offset_rows`` keys else 1;
    R = relu(x)^p, rows l1-normalised. Computed as (relu(x)/max_i)^p, identical after the
    normalisation but free of fp32 overflow at long lengths (the row max is a constant for the
    ratio, so detaching it leaves the gradient unchanged). A row with no positive x (e.g. exactly
    uniform) falls back to the LSSA row, or is all-zero as in the reference if
    ``fallback_on_empty`` is False.
    """
    n = _visible_counts(visible, a.shape, a)
    offset = (n > offset_rows).to(a.dtype)
    r = torch.relu(n * a - offset)
    if visible is not None:
        r = torch.where(visible, r, torch.zeros_like(r))
    m = r.amax(dim=-1, keepdim=True).detach()
    empty = m <= 0
    rp = (r / torch.where(empty, torch.ones_like(m), m)) ** p
    w = rp / (rp.sum(dim=-1, keepdim=True) + eps)
    if fallback_on_empty:
        return torch.where(empty, a, w)
    return torch.where(empty, torch.zeros_like(w), w)


def softplus_weights(q: torch.Tensor, k_t: torch.Tensor, visible: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, *, reweight: bool = False, p: float = 15.0,
                     eps: float = 1e-8, offset_rows: int = 3,
                     fallback_on_empty: bool = True) -> torch.Tensor:
    """LSSA weights, followed by LSSAR re-weighting when ``reweight`` is True."""
    a = lssa_weights(q, k_t, visible, bias, eps)
    if reweight:
        a = lssar_weights(a, visible, p, eps, offset_rows, fallback_on_empty)
    return a


def causal_visible(length_q: int, length_k: int, device=None) -> torch.Tensor:
    """Lower-triangular (top-left aligned) visibility, as SDPA's ``is_causal`` defines it."""
    return torch.ones(length_q, length_k, dtype=torch.bool, device=device).tril()


def visible_from_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split an attention mask into (visible bool, finite additive bias or None).

    Boolean masks follow SDPA (True = attend). Float masks are additive: entries <= -1e4
    (including -inf and finfo.min) are masked; the remaining values are a bias on the logits.
    """
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    visible = mask > MASK_THRESHOLD
    bias = torch.where(visible, mask, torch.zeros_like(mask))
    return visible, bias


def _combine(visible: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    if visible is None:
        return extra
    if extra is None:
        return visible
    return visible & extra


def _gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:  # grouped-query attention: every kv head serves hq // hk query heads
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    return k, v


def stablemax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """SDPA with StableMax in place of softmax: stablemax(q k^T * scale + bias) @ v.

    Same argument conventions as ``F.scaled_dot_product_attention`` (bool mask True = attend,
    float mask additive, GQA when k/v have fewer heads). Returns q's dtype.
    """
    k, v = _gqa(q, k, v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    visible, bias = visible_from_mask(mask)
    if bias is not None:
        logits = logits + bias.to(acc)
    if is_causal:
        visible = _combine(visible, causal_visible(q.shape[-2], k.shape[-2], q.device))
    w = stablemax_weights(logits, visible)
    return (w @ v.to(acc)).to(q.dtype)


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       is_causal: bool = False, *, reweight: bool = False, p: float = 15.0,
                       eps: float = 1e-8, offset_rows: int = 3,
                       fallback_on_empty: bool = True) -> torch.Tensor:
    """LSSA (or LSSAR with ``reweight=True``) attention output, SDPA argument conventions.

    The 1/sqrt(D) scale of softmax attention is replaced by the cosine form of LSSA, so there is
    no ``scale`` argument. Returns q's dtype.
    """
    k, v = _gqa(q, k, v)
    visible, bias = visible_from_mask(mask)
    if is_causal:
        visible = _combine(visible, causal_visible(q.shape[-2], k.shape[-2], q.device))
    w = softplus_weights(q, k.transpose(-2, -1), visible, bias, reweight=reweight, p=p, eps=eps,
                         offset_rows=offset_rows, fallback_on_empty=fallback_on_empty)
    return (w @ v.to(w.dtype)).to(q.dtype)
