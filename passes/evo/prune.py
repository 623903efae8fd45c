"""`prune SEL to 60% using evopress(levels=[0%, 10%, ..., 90%], method=sparsegpt(), data=calib)`:
per-layer sparsities found by EvoPress, averaging exactly the statement's percentage over the
selected parameters (docs/passes/evopress.md)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field, field_validator

from surgery.passapi import CallValue, Granularity, Percent, StepReport
from surgery.passes.prune.base import PrunePass
from surgery.registry import register

from . import variants
from .budget import BudgetProblem, check_budget
from .common import (SearchParams, build_and_search, database_key, dense_targets, fill_report,
                     start_level)
from .database import VariantDB
from .search import average, initial_state

DEFAULT_PRUNE_LEVELS = [Percent(value=10.0 * i) for i in range(10)]


class EvoPruneParams(SearchParams):
    sparsity: Percent | Any  # filled by `to P%`: the average
    levels: list[Percent] = Field(DEFAULT_PRUNE_LEVELS, validate_default=True)
    method: CallValue | str = Field("sparsegpt", validate_default=True)

    @field_validator("sparsity")
    @classmethod
    def _avg(cls, v):
        if not isinstance(v, Percent):
            raise ValueError("evopress needs an average sparsity such as 60%, not an N:M pattern")
        return v

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, v, info):
        if not isinstance(v, list) or not v or not all(isinstance(x, Percent) for x in v):
            raise ValueError("levels must be a list of percentages such as [0%, 10%, 20%]")
        if any(not 0 <= x.value < 100 for x in v):
            raise ValueError("each level must be in [0%, 100%)")
        if len({x.value for x in v}) != len(v):
            raise ValueError("levels must not repeat")
        v = sorted(v, key=lambda x: x.value)
        avg = info.data.get("sparsity")
        if isinstance(avg, Percent) and not v[0].value <= avg.value <= v[-1].value:
            raise ValueError(f"infeasible budget: an average of {avg} cannot be made from "
                             f"levels {v[0]}..{v[-1]}")
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v, info):
        v = variants.as_call(v)
        variants.inner_params("prune", v, info.data.get("data"))
        return v


@register
class EvoPressPrune(PrunePass):
    method = "evopress"
    granularity = Granularity.MODEL  # the fitness runs whole-model forwards
    summary = "per-layer sparsities under an exact average, found by evolutionary search"
    Params = EvoPruneParams

    def values(self) -> list[float]:
        return [lv.value for lv in self.params.levels]

    def check_targets(self, targets) -> BudgetProblem | None:
        return check_budget(targets, self.values(), self.params.sparsity.value, "%")

    def prune(self, ctx, modules, report: StepReport) -> None:
        p: EvoPruneParams = self.params
        inner = variants.inner_params("prune", p.method, p.data)
        paths = list(modules)
        values = self.values()
        sizes = [modules[q].weight.numel() for q in paths]
        calib = ctx.dataset(p.data).calibration
        kl = dense_targets(ctx, p)  # before the database changes any weight
        start = initial_state(sizes, values, p.sparsity.value)
        level_of = dict(zip(paths, start))
        db = VariantDB(p.database, database_key(paths, values, p.method, calib, ctx.model,
                                                start))
        t0 = time.perf_counter()
        try:
            def transform(mods, stats):  # every level of every layer (see start_level)
                for path, mod in mods.items():
                    W = mod.weight.detach()
                    for li, v in enumerate(values):
                        Wn, keep = variants.prune_variant(p.method, inner, W, stats[path],
                                                          v / 100)
                        db.put(path, li, {"weight": Wn.to(W.dtype), "keep": keep},
                               variants.output_error(W, Wn, stats[path]))
                start_level(mods, db, level_of)

            result = build_and_search(ctx, p, db, calib, modules, transform, report, t0=t0,
                                      paths=paths, kl=kl, start=start, sizes=sizes,
                                      values=values, label="evopress prune")
            for path, lv in zip(paths, result.state):
                got = db.get(path, lv)
                self.install(ctx, path, got["keep"], weight=got["weight"], report=report)
                report.per_module[path]["level"] = f"{values[lv]:g}%"
            fill_report(report, result, paths, [values[lv] for lv in result.state],
                        [db.errors[q][lv] for q, lv in zip(paths, result.state)],
                        key="sparsity_level", level_label="sparsity (%)",
                        title=f"EvoPress: {p.sparsity} average sparsity",
                        realised=average(result.state, sizes, values))
        finally:
            db.close()
