"""Git Re-Basin (Ainsworth et al., ICLR 2023): align B's units to A's by weight or activation
matching over automatically derived permutation groups, then interpolate."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from surgery.passapi import DataRef, Granularity, PassError, PassResult, StepReport
from surgery.registry import register

from .bn import has_batchnorm, recompute_bn_stats
from .common import MergeParams, MergePass
from .matching import activation_matching, weight_matching
from .permspec import PermSpecError, apply_perm, derive_spec


def model_batches(ctx, data: str | None, batch_size: int, limit: int | None = None) -> list:
    """Calibration rows of a `data` declaration, as model-input batches."""
    if data is None:
        return []
    ds = ctx.dataset(data)
    rows = ds.calibration
    out = [rows[i:i + batch_size] for i in range(0, rows.shape[0], batch_size)]
    return out[:limit] if limit else out


def spec_for(model: nn.Module, example=None):
    try:
        return derive_spec(model, example)
    except PermSpecError as e:
        raise PassError(f"cannot derive permutation groups: {e}",
                        hint="supported: MLPs, CNNs with residuals and BatchNorm, transformer "
                             "MLP blocks") from None


def align_to(spec, a: nn.Module, b: nn.Module, *, matching: str, batches, similarity: str,
             max_iter: int, seed: int, progress=None):
    """(perms, costs) aligning b's units to a's."""
    if matching == "activation":
        return activation_matching(spec, a, b, batches, similarity=similarity, progress=progress)
    return weight_matching(spec, a.state_dict(), b.state_dict(), max_iter=max_iter, seed=seed,
                           progress=progress)


def interpolate(states: list[dict], weights: list[float]) -> dict:
    """Weighted average of floating tensors; integer buffers from the first state."""
    out = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            out[k] = sum(w * s[k].float() for w, s in zip(weights, states)).to(v.dtype)
        else:
            out[k] = v
    return out


class WeightMatchingParams(MergeParams):
    matching: Literal["weight", "activation"] = "weight"
    data: DataRef | None = None  # names a `data` declaration
    similarity: Literal["neg_l2", "inner", "pearson"] = "neg_l2"
    max_iter: int = Field(100, ge=1)
    seed: int = 0
    t: float = Field(0.5, description="interpolation point: 0 = A, 1 = aligned B")
    batch_size: int = Field(8, ge=1)
    batches: int | None = Field(None, ge=1, description="calibration batches used (default all)")
    bn_batches: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _needs(self):
        if self.matching == "activation" and self.data is None:
            raise ValueError("activation matching needs data: pass data=NAME")
        if not 0.0 <= self.t <= 1.0:
            raise ValueError("t must be in [0, 1]")
        return self


@register
class WeightMatchingMerge(MergePass):
    method = "weight_matching"
    summary = "Git Re-Basin: permute B's units onto A's (weights or activations), interpolate"
    Params = WeightMatchingParams
    granularity = Granularity.MODEL  # permutations are found on the whole model

    def extra_checks(self, models):
        m = next(iter(models.values()))
        try:
            derive_spec(m)
        except PermSpecError as e:
            return [f"cannot derive permutation groups: {e}"]
        except Exception:  # a model needing real example inputs: checked again at run time
            return []
        return []

    def apply(self, ctx, modules):
        p = self.params
        _, models = self.resolve(ctx)
        if len(models) < 2:
            raise PassError("weight_matching merges at least two models")
        batches = model_batches(ctx, p.data, p.batch_size, p.batches)
        ref = models[0]
        spec = spec_for(ref, (batches[0],) if batches else None)
        states = [ref.state_dict()]
        perms_all = []
        for other in models[1:]:
            perms, _ = align_to(spec, ref, other, matching=p.matching, batches=batches,
                                similarity=p.similarity, max_iter=p.max_iter, seed=p.seed,
                                progress=ctx.progress)
            perms_all.append(perms)
            states.append(apply_perm(spec, perms, other.state_dict()))
        w = [1 - p.t, p.t] if len(models) == 2 else [1 / len(models)] * len(models)
        out = copy.deepcopy(ref)
        out.load_state_dict(interpolate(states, w))
        notes = list(spec.notes)
        if has_batchnorm(out):
            if batches:
                recompute_bn_stats(out, batches, p.bn_batches)
                notes.append("BatchNorm statistics re-estimated on data")
            else:
                notes.append("BatchNorm statistics interpolated, not re-estimated: pass data=NAME")
        moved = sum(int((P != torch.arange(P.numel())).sum()) for ps in perms_all
                    for P in ps.values())
        return PassResult(out, StepReport(
            modules=len(models), parameters=sum(v.numel() for v in out.parameters()),
            metrics={"groups": len(spec.groups), "units_moved": moved, "matching": p.matching,
                     "t": p.t}, notes=notes))
