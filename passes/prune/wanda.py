"""`prune SEL to 2:4 using wanda(data=calib)`: score ``|W_ij| · ||X_j||₂`` (``wanda: prune_wanda``).

Scores compare within each output row (``scope="row"``, the reference) or the whole layer; N:M
compares within each group. No weight values change. Layer-sequential calibration.
"""

from __future__ import annotations

from typing import Literal

from surgery.passapi import DataRef, StepReport
from surgery.registry import register

from .base import PrunePass, PruneParams


class WandaParams(PruneParams):
    data: DataRef
    scope: Literal["row", "layer"] | None = None


def wanda_scores(W, col_norms):
    """|W| times the input column norms ||X_j||₂ (sqrt of the Gram diagonal)."""
    return W.abs().float() * col_norms.float().view(1, -1)


@register
class WandaPrune(PrunePass):
    method = "wanda"
    summary = "prune by |weight| x input activation norm (Wanda)"
    Params = WandaParams
    default_scope = "row"

    def prune(self, ctx, modules, report: StepReport) -> None:
        def transform(mods, stats):
            for path, mod in mods.items():
                W = mod.weight.detach().float()
                scores = wanda_scores(W, stats[path].col_norms())
                keep = self.refine(path, W, self.select(scores), scores, stats[path], report)
                self.install(ctx, path, keep, report=report)

        self.calibrate(ctx, modules, gram=False, transform=transform)
