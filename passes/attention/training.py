"""Training utilities from "Grokking at the Edge of Numerical Stability" (ops.md §1.3, §1.4).

* :func:`stablemax_cross_entropy`: cross-entropy with log-StableMax instead of log-softmax.
  The reference upcasts to float64; we do the same by default (``dtype=torch.float64``) and return
  the input dtype unless ``keep_fp64=True``.
* :class:`OrthoGrad` (the paper's perpGrad / ⊥Grad): an optimizer wrapper that removes the
  component of each gradient parallel to its weight and rescales to the original gradient norm.

The lead re-exports these as ``surgery.training``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .functional import log_stablemax

__all__ = ["stablemax_cross_entropy", "OrthoGrad", "PerpGrad", "orthogonal_grad"]


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                            dtype: torch.dtype = torch.float64, keep_fp64: bool = False) -> torch.Tensor:
    """StableMax cross-entropy: mean_b -log StableMax(logits_b)[label_b].

    logits: (B, C) (or (..., C), flattened); labels: integer (B,). ``dtype`` is the internal
    compute dtype (float64 as in the reference, or float32: log-StableMax has no exp, so it
    cannot overflow, only lose precision). reduction: "mean", "sum" or "none" (shape (B,)).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    logits2 = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1).long()
    if logits2.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits2.shape[0]} rows of logits but {labels.shape[0]} labels")
    logp = log_stablemax(logits2.to(dtype), dim=-1)
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
    loss = nll.mean() if reduction == "mean" else nll.sum() if reduction == "sum" else nll
    out_dtype = dtype if keep_fp64 else logits.dtype
    return loss.to(out_dtype)


def orthogonal_grad(w: torch.Tensor, g: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """g minus its projection on w (whole tensor flattened), rescaled to ||g|| if ``rescale``."""
    wf, gf = w.reshape(-1), g.reshape(-1)
    proj = torch.dot(wf, gf) / (torch.dot(wf, wf) + 1e-30)
    g_perp = gf - proj * wf
    if rescale:
        g_perp = g_perp * (gf.norm() / (g_perp.norm() + 1e-30))
    return g_perp.view_as(g)


class OrthoGrad(torch.optim.Optimizer):
    """perpGrad (⊥Grad): wrap a base optimizer so it steps on gradients orthogonal to the weights.

    ``OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99))`` builds the base
    optimizer over the same parameter groups; ``rescale`` keeps each gradient's norm as the
    reference code does (the paper's formula is the bare projection: ``rescale=False``).
    """

    def __init__(self, params: Iterable[Any], base_optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
                 rescale: bool = True, **base_kwargs: Any):
        defaults = dict(rescale=rescale, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.rescale = rescale

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.grad.copy_(orthogonal_grad(p, p.grad, self.rescale))
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)


PerpGrad = OrthoGrad  # the paper's name
