"""`prune SEL to 2:4 using magnitude()`: keep the largest |w| (``wanda: prune_magnitude``).

Unstructured compares the whole layer by default (``scope="layer"``; ``"row"`` per output row).
``training=mdgf(...)|sdgf(...)|srste(...)|ste()`` instead prepares N:M sparse training: the
weights stay dense and the mask is recomputed every forward on the schedule (training.py).
``refine=dsnot()`` needs ``data=``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from surgery.passapi import NM, DataRef, Granularity, StepReport
from surgery.registry import register

from .base import PrunePass, PruneParams, _call_to_dict
from .training import METHODS, TrainingConfig, sdgf_patterns


class MagnitudeParams(PruneParams):
    scope: Literal["row", "layer"] | None = None
    data: DataRef | None = None  # only for refine=dsnot()
    training: TrainingConfig | None = None

    @field_validator("training", mode="before")
    @classmethod
    def _training(cls, v: Any) -> Any:
        return _call_to_dict(v, METHODS, "training schedule")

    @model_validator(mode="after")
    def _combos(self) -> "MagnitudeParams":
        if self.refine is not None and self.data is None:
            raise ValueError("refine=dsnot() needs calibration data: add data=NAME")
        if self.training is not None:
            if not isinstance(self.sparsity, NM):
                raise ValueError("sparse training schedules need an N:M target such as 2:4")
            if self.refine is not None:
                raise ValueError("refine and training cannot be combined")
            if self.training.method == "sdgf":
                sdgf_patterns(self.training.structure, self.sparsity.n, self.sparsity.m)
        return self


@register
class MagnitudePrune(PrunePass):
    method = "magnitude"
    summary = "keep the largest-magnitude weights (N:M or unstructured)"
    is_default = True
    Params = MagnitudeParams
    default_scope = "layer"
    granularity = Granularity.TENSOR

    def __init__(self, params: MagnitudeParams):
        super().__init__(params)
        if params.refine is not None:  # DSnoT calibrates block by block
            self.granularity = Granularity.BLOCK

    def prune(self, ctx, modules, report: StepReport) -> None:
        p = self.params
        if p.training is not None:
            for path, mod in modules.items():
                self.install(ctx, path, self.select(mod.weight.detach().abs().float()),
                             training=p.training)
            report.notes.append(f"prepared for {p.sparsity} sparse training with "
                                f"{p.training.method}; call finalize_sparse_training(model) "
                                "after training")
            return
        if p.refine is None:
            with ctx.progress.task("magnitude pruning", total=len(modules)) as t:
                for path, mod in modules.items():
                    self.install(ctx, path, self.select(mod.weight.detach().abs().float()),
                                 report=report)
                    t.advance()
            return

        def transform(mods, stats):
            for path, mod in mods.items():
                W = mod.weight.detach().float()
                keep = self.select(W.abs())
                keep = self.refine(path, W, keep, W.abs(), stats[path], report)
                self.install(ctx, path, keep, report=report)

        self.calibrate(ctx, modules, gram=False, transform=transform)
