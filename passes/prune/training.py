"""N:M sparse training schedules (ops.md §7.1): MDGF, SDGF, SR-STE and plain STE.

The schedule is a pure function of the optimizer step ``t``. Masks are recomputed every training
forward from the current dense weights (keep the N largest |w| per group of M inputs); the dense
weights keep receiving gradients, which is what lets pruned weights come back.

Phases: dense for ``dense_steps`` -> sparse phase -> the last ``fine_tune_steps`` use the plain
binary target mask. Step counting is ours (the reference mixes epochs and fractions of steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

METHODS = ("mdgf", "sdgf", "srste", "ste")


class TrainingConfig(BaseModel):
    """``training=mdgf(...)`` / ``sdgf(...)`` / ``srste(...)`` / ``ste(...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mdgf", "sdgf", "srste", "ste"]
    decay: Literal["exp", "linear"] = "exp"  # MDGF: beta(t) = exp(-k t) or max(0, 1 - k t)
    decay_coef: float = 2e-4  # kappa, per optimizer step (reference CLI default)
    grad_mode: Literal["ste", "exact"] = "ste"  # MDGF backward: reference STE, or true autograd
    structure: Literal["sparsify", "fine", "densify"] = "sparsify"  # SDGF frame patterns
    total_steps: int | None = None  # needed by SDGF and by fine_tune_steps
    dense_steps: int = 0
    fine_tune_steps: int = 0
    lambda_w: float = 2e-4  # SR-STE decay on pruned weights (reference value)

    @field_validator("decay_coef", "lambda_w")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("dense_steps", "fine_tune_steps")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @model_validator(mode="after")
    def _steps(self) -> "TrainingConfig":
        needs_total = self.method == "sdgf" or self.fine_tune_steps > 0
        if needs_total and self.total_steps is None:
            raise ValueError(f"{self.method} needs total_steps (the length of the training run)")
        if self.total_steps is not None:
            if self.total_steps < 1:
                raise ValueError("total_steps must be >= 1")
            if self.dense_steps + self.fine_tune_steps > self.total_steps:
                raise ValueError("dense_steps + fine_tune_steps exceed total_steps")
        return self


def sdgf_patterns(structure: str, n: int, m: int) -> list[tuple[int, int]]:
    """The N:M pattern of each SDGF frame, ending at the target ``n:m``."""
    if structure == "sparsify":
        ratio = m // n
        if m % n or ratio & (ratio - 1):
            raise ValueError(f"SDGF sparsify needs M/N to be a power of two (got {n}:{m})")
        steps = int(math.log2(ratio))
        return [(m - 1, m)] + [(m >> k, m) for k in range(1, steps + 1)]
    if structure == "fine":
        return [(n << (3 - k), m << (3 - k)) for k in range(4)]
    return [(n, m << (3 - k)) for k in range(4)]  # densify


def pattern_group_sizes(cfg: TrainingConfig | None, n: int, m: int) -> set[int]:
    """Every group size M' the schedule uses (each must divide in_features)."""
    if cfg is None or cfg.method != "sdgf":
        return {m}
    return {mm for _, mm in sdgf_patterns(cfg.structure, n, m)} | {m}


@dataclass(frozen=True)
class Phase:
    kind: str  # "dense" | "binary" | "decay" | "srste"
    n: int = 0
    m: int = 0
    beta: float = 0.0


def phase_at(cfg: TrainingConfig, n: int, m: int, t: int) -> Phase:
    if t < cfg.dense_steps:
        return Phase("dense")
    if cfg.total_steps is not None and cfg.fine_tune_steps and t >= cfg.total_steps - cfg.fine_tune_steps:
        return Phase("binary", n, m)
    s = t - cfg.dense_steps  # steps since the end of the dense phase
    if cfg.method == "mdgf":
        k = cfg.decay_coef
        beta = math.exp(-k * s) if cfg.decay == "exp" else max(0.0, 1.0 - k * s)
        return Phase("decay", n, m, beta)
    if cfg.method == "sdgf":
        pats = sdgf_patterns(cfg.structure, n, m)
        length = (cfg.total_steps - cfg.dense_steps - cfg.fine_tune_steps) / len(pats)
        frame = 0
        for k in range(len(pats)):
            if s >= int(k * length):
                frame = k
        nn_, mm = pats[frame]
        return Phase("binary", nn_, mm)
    if cfg.method == "srste":
        return Phase("srste", n, m)
    return Phase("binary", n, m)


class _MaskedSTE(torch.autograd.Function):
    """Forward ``w * factor``; backward passes the gradient to every dense weight unchanged."""

    @staticmethod
    def forward(ctx, w, factor):
        return w * factor

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SRSTE(torch.autograd.Function):
    """Forward ``w * mask``; backward ``g + lambda * (1 - mask) * w`` (Zhou et al. 2021)."""

    @staticmethod
    def forward(ctx, w, keep, lam):
        ctx.save_for_backward(w, keep)
        ctx.lam = lam
        return w * keep

    @staticmethod
    def backward(ctx, g):
        w, keep = ctx.saved_tensors
        return g + ctx.lam * (~keep).to(w.dtype) * w, None, None


def effective_weight(w: torch.Tensor, phase: Phase, cfg: TrainingConfig, keep_fn) -> torch.Tensor:
    """The weight a training forward uses in ``phase``; ``keep_fn(w, n, m)`` gives the mask."""
    if phase.kind == "dense":
        return w
    keep = keep_fn(w.detach(), phase.n, phase.m)
    if phase.kind == "srste":
        return _SRSTE.apply(w, keep, cfg.lambda_w)
    if phase.kind == "decay":
        factor = keep.to(w.dtype) + (~keep).to(w.dtype) * phase.beta
        if cfg.grad_mode == "exact":
            return w * factor
        return _MaskedSTE.apply(w, factor)
    return _MaskedSTE.apply(w, keep.to(w.dtype))
