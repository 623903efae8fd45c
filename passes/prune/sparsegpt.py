"""`prune SEL to 2:4 using sparsegpt(data=calib, block=128, damp=0.01)` (sparsegpt_core.py).

With ``refine=dsnot()`` SparseGPT supplies only its saliency ``w² / [Hinv]_jj²`` as the initial
metric (per-row or N:M mask, no weight update), as the DSnoT reference does: DSnoT changes masks,
never weight values, so the OBS update would not match the refined mask.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import field_validator, model_validator

from surgery.passapi import NM, DataRef, PassError, StepReport
from surgery.passes.calib import HessianError, prepare_hessian
from surgery.registry import register

from .base import PrunePass, PruneParams, _call_to_dict
from .training import METHODS, TrainingConfig, sdgf_patterns
from .masks import nm_keep, row_keep
from .sparsegpt_core import sparsegpt


class SparseGPTParams(PruneParams):
    data: DataRef
    block: int = 128
    damp: float = 0.01
    # training=mdgf(...)|sdgf(...)|srste(...)|ste(): keep SparseGPT's updated weights and mask as
    # the starting point of N:M sparse training (`train SEL ...` runs it, then fixes the mask).
    training: TrainingConfig | None = None

    @field_validator("training", mode="before")
    @classmethod
    def _training(cls, v: Any) -> Any:
        return _call_to_dict(v, METHODS, "training schedule")

    @model_validator(mode="after")
    def _training_combos(self) -> "SparseGPTParams":
        if self.training is not None:
            if not isinstance(self.sparsity, NM):
                raise ValueError("sparse training schedules need an N:M target such as 2:4")
            if self.refine is not None:
                raise ValueError("refine and training cannot be combined")
            if self.training.method == "sdgf":
                sdgf_patterns(self.training.structure, self.sparsity.n, self.sparsity.m)
        return self

    @field_validator("block")
    @classmethod
    def _block(cls, v: int) -> int:
        if v < 1:
            raise ValueError("block must be >= 1")
        return v

    @field_validator("damp")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("damp must be in (0, 1]")
        return v


@register
class SparseGPTPrune(PrunePass):
    method = "sparsegpt"
    summary = "prune with OBS weight updates from the layer Hessian (SparseGPT)"
    Params = SparseGPTParams

    def estimate_memory(self, modules) -> int:
        return max((m.in_features ** 2 * 16 for m in modules.values()), default=0)

    def prune(self, ctx, modules, report: StepReport) -> None:
        p = self.params
        n, m = self.nm
        frac = None if isinstance(p.sparsity, NM) else p.sparsity.fraction

        def transform(mods, stats):
            for path, mod in mods.items():
                W = mod.weight.detach()
                H = stats[path].hessian() if p.refine else stats[path].take_hessian()
                try:
                    if p.refine is None:
                        Wn, keep = sparsegpt(W, H, n=n, m=m, fraction=frac, blocksize=p.block,
                                             percdamp=p.damp, consume_hessian=True)
                        del H
                        self.install(ctx, path, keep, weight=Wn, report=report,
                                     training=p.training)
                        continue
                    Wf, Hinv, _, _ = prepare_hessian(H, W.clone().float(), p.damp)
                except HessianError as e:
                    raise PassError(f"{path}: {e}", module=path, hint="raise damp, e.g. damp=0.1")
                sal = Wf ** 2 / torch.diag(Hinv).view(1, -1) ** 2
                keep = nm_keep(sal, n, m) if n else row_keep(sal, frac)
                keep = self.refine(path, Wf, keep, sal, stats[path], report)
                self.install(ctx, path, keep, report=report)

        self.calibrate(ctx, modules, gram=True, transform=transform)
