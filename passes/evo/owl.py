"""`prune SEL to 60% using owl(method=sparsegpt(), data=calib, lamda=0.08, m=5)`: OWL's
outlier-weighted layerwise sparsity (Yin et al., 2024), the heuristic baseline of EvoPress.

Per decoder block, the layer outlier distribution (LOD) is the share of the block's Wanda scores
|W_ij|·||X_j|| above m times their mean (on the dense model). LODs are scaled to [0, 2·lamda];
block b gets sparsity S - (z_b - mean z), so blocks with more outliers are pruned less and the
average stays S (blocks are the same size, so it is also the parameter-weighted average). Each
block is then pruned by the nested method at its sparsity, layer-sequentially.
"""

from __future__ import annotations

import torch
from pydantic import field_validator

from surgery.passapi import CallValue, DataRef, PassError, PassParams, Percent, StepReport
from surgery.passes.calib import calibrate_sequential
from surgery.passes.calib.engine import find_blocks
from surgery.passes.prune.base import PrunePass
from surgery.passes.prune.wanda import wanda_scores
from surgery.registry import register

from . import variants


class OwlParams(PassParams):
    sparsity: Percent | object
    data: DataRef
    method: CallValue | str = "sparsegpt"
    lamda: float = 0.08  # the spread: sparsities lie within S ± lamda
    m: float = 5.0  # an outlier is a score above m x the block's mean score
    batch_size: int = 8

    @field_validator("sparsity")
    @classmethod
    def _avg(cls, v):
        if not isinstance(v, Percent):
            raise ValueError("owl needs an average sparsity such as 60%, not an N:M pattern")
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v):
        v = variants.as_call(v)
        return v

    @field_validator("lamda")
    @classmethod
    def _lamda(cls, v):
        if not 0 <= v < 0.5:
            raise ValueError("lamda must be in [0, 0.5)")
        return v

    @field_validator("m")
    @classmethod
    def _m(cls, v):
        if v <= 0:
            raise ValueError("m must be > 0")
        return v


def owl_sparsities(lods: list[float], target: float, lamda: float) -> list[float]:
    """Per-block sparsity fractions from outlier ratios (mean exactly ``target``)."""
    lo, hi = min(lods), max(lods)
    z = [0.0 if hi == lo else (x - lo) / (hi - lo) * 2 * lamda for x in lods]
    mean = sum(z) / len(z)
    return [target - (x - mean) for x in z]


@register
class OwlPrune(PrunePass):
    method = "owl"
    summary = "OWL: per-block sparsity from outlier ratios (the heuristic baseline)"
    Params = OwlParams

    def prune(self, ctx, modules, report: StepReport) -> None:
        p: OwlParams = self.params
        inner = variants.inner_params("prune", p.method, p.data)
        calib = ctx.dataset(p.data).calibration
        _, blocks = find_blocks(ctx.model, list(modules))
        block_of = {q: next((b for b in blocks if q.startswith(b + ".")), "") for q in modules}
        order = list(dict.fromkeys(block_of.values()))
        scores: dict[str, list[torch.Tensor]] = {b: [] for b in order}

        def collect(mods, stats):  # the dense model's Wanda scores, one block at a time
            for path, mod in mods.items():
                scores[block_of[path]].append(
                    wanda_scores(mod.weight.detach(), stats[path].col_norms()).flatten())
            return None

        calibrate_sequential(ctx.model, calib, modules, collect, progress=ctx.progress,
                             batch_size=p.batch_size, gram=False, label="owl: outlier ratios")
        lods = []
        for b in order:
            s = torch.cat(scores.pop(b))
            lods.append(float((s > p.m * s.mean()).float().mean()))
        fracs = owl_sparsities(lods, p.sparsity.fraction, p.lamda)
        if min(fracs) < 0 or max(fracs) >= 1:
            raise PassError(f"owl sparsities leave [0, 1): {min(fracs):.3f}..{max(fracs):.3f}",
                            hint="lower lamda")
        frac_of = dict(zip(order, fracs))

        def transform(mods, stats):
            for path, mod in mods.items():
                f = frac_of[block_of[path]]
                Wn, keep = variants.prune_variant(p.method, inner, mod.weight.detach(),
                                                  stats[path], f)
                self.install(ctx, path, keep, weight=Wn, report=report)
                report.per_module[path]["level"] = f"{100 * f:.2f}%"

        calibrate_sequential(ctx.model, calib, modules, transform, progress=ctx.progress,
                             batch_size=p.batch_size, gram=variants.needs_gram("prune", p.method),
                             label=f"owl: prune ({variants.as_call(p.method).name})")
        report.metrics["owl_outlier_ratios"] = {b or "<model>": round(x, 6)
                                               for b, x in zip(order, lods)}
        report.metrics["owl_sparsities"] = {b or "<model>": round(f, 6)
                                            for b, f in zip(order, fracs)}
