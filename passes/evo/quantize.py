"""`quantize SEL to int3 using evopress(levels=[2, 3, 4, 8], method=gptq(group=64), data=calib)`:
per-layer bit widths found by EvoPress; with `evopress` the format names the exact average
bit width over the selected parameters (docs/passes/evopress.md)."""

from __future__ import annotations

import re
import time

import torch
from pydantic import Field, field_validator

from surgery.passapi import CallValue, Granularity, PassError, PassResult, StepReport, replace_module
from surgery.passes.quantize.common import QuantizePass, float_bytes
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.registry import register

from . import variants
from .budget import BudgetProblem, check_budget
from .common import (SearchParams, build_and_search, database_key, dense_targets, fill_report,
                     start_level)
from .database import VariantDB
from .search import average, initial_state


def supported_bits(bits: int) -> bool:
    """Whether this build's QuantLinear stores ``bits`` (checked, not assumed: the formats are
    the quantize family's)."""
    try:
        with torch.device("meta"):
            QuantLinear(8, 8, bits=bits, group=8, symmetric=True)
    except ValueError:
        return False
    return True


class EvoQuantParams(SearchParams):
    format: str  # filled by `to intN`: the average bit width
    levels: list[int] = Field([2, 3, 4, 8], validate_default=True)
    method: CallValue | str = Field("gptq", validate_default=True)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if not re.fullmatch(r"int[2-8]", v):
            raise ValueError(f"`{v}` is not an average bit width: write int2 ... int8")
        return v

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, v, info):
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and
                                                       not isinstance(x, bool) for x in v):
            raise ValueError("levels must be a list of bit widths such as [2, 3, 4, 8]")
        bad = [x for x in v if not 2 <= x <= 8]
        if bad:
            raise ValueError(f"levels must be bit widths from 2 to 8 (got {bad[0]})")
        if len(set(v)) != len(v):
            raise ValueError("levels must not repeat")
        missing = [x for x in v if not supported_bits(x)]
        if missing:
            raise ValueError(f"int{missing[0]} is not a storage format of this build")
        fmt = info.data.get("format")
        if fmt and not min(v) <= int(fmt[3:]) <= max(v):
            raise ValueError(f"infeasible budget: an average of {fmt[3:]} bits cannot be made "
                             f"from levels {sorted(v)}")
        return sorted(v)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v, info):
        v = variants.as_call(v)
        variants.inner_params("quantize", v, info.data.get("data"))
        return v

    @property
    def bits(self) -> int:
        return int(self.format[3:])


@register
class EvoPressQuantize(QuantizePass):
    method = "evopress"
    granularity = Granularity.MODEL  # the fitness runs whole-model forwards
    summary = "per-layer bit widths under an exact average, found by evolutionary search"
    Params = EvoQuantParams

    @property
    def inner(self):
        return variants.inner_params("quantize", self.params.method, self.params.data)

    def check_module(self, path, module):
        if isinstance(module, QuantLinear):
            return f"already quantized (int{module.bits})"
        g = getattr(self.inner, "group", None)
        if g is not None and module.in_features % g:
            from surgery.passapi import ShapeProblem
            return ShapeProblem(f"group {g} does not divide in_features {module.in_features}")
        return None

    def check_targets(self, targets) -> BudgetProblem | None:
        return check_budget(targets, [float(b) for b in self.params.levels], self.params.bits,
                            " bits")

    def quant_config(self, module):
        # The plan shows the average width; each layer's own width is chosen at run time.
        inner = self.inner
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bits": 8 if self.params.bits > 4 else 4,
                "group": inner.group_for(module.in_features),
                "symmetric": True, "bias": module.bias is not None, "permuted": False,
                "dtype": str(module.weight.dtype).removeprefix("torch.")}

    def ensures(self, model, targets, result: PassResult) -> None:
        for path in targets:
            if model.get_submodule(path).bits not in self.params.levels:
                raise PassError(f"internal: `{path}` got a width outside the levels", module=path)

    def apply(self, ctx, modules) -> PassResult:
        p: EvoQuantParams = self.params
        inner = self.inner
        paths = list(modules)
        values = [float(b) for b in p.levels]
        sizes = [modules[q].weight.numel() for q in paths]
        report = StepReport(modules=len(paths), parameters=sum(sizes))
        calib = ctx.dataset(p.data).calibration
        kl = dense_targets(ctx, p)  # before the database changes any weight
        start = initial_state(sizes, values, p.bits)
        level_of = dict(zip(paths, start))
        db = VariantDB(p.database, database_key(paths, values, p.method, calib, ctx.model,
                                                start))
        t0 = time.perf_counter()
        before = sum(float_bytes(m) for m in modules.values())
        try:
            def transform(mods, stats):
                for path, mod in mods.items():
                    W = mod.weight.detach()
                    for li, b in enumerate(p.levels):
                        try:
                            q = variants.quant_variant(p.method, inner, mod, stats[path], b)
                        except ValueError as e:  # HessianError is a ValueError
                            raise PassError(f"{path}: {e}", module=path,
                                            hint="raise damp in the method, e.g. damp=0.1")
                        Wq = q.dequantized_weight()
                        db.put(path, li, {"weight": Wq.to(W.dtype), "module": q},
                               variants.output_error(W, Wq, stats[path]))
                start_level(mods, db, level_of)

            result = build_and_search(ctx, p, db, calib, modules, transform, report, t0=t0,
                                      paths=paths, kl=kl, start=start, sizes=sizes,
                                      values=values, label="evopress quantize")
            after = 0
            for path, lv in zip(paths, result.state):
                q = db.get(path, lv)["module"]
                orig = ctx.model.get_submodule(path)
                replace_module(ctx.model, path, q)
                after += q.storage_bytes()
                report.per_module[path] = {"bits": p.levels[lv], "parameters": orig.weight.numel()}
            report.metrics.update({"format": f"average {p.format}", "bytes_before": before,
                                   "bytes_after": after,
                                   "compression": round(before / after, 3) if after else None})
            fill_report(report, result, paths, [float(p.levels[lv]) for lv in result.state],
                        [db.errors[q][lv] for q, lv in zip(paths, result.state)],
                        key="bits", level_label="bits",
                        title=f"EvoPress: {p.bits} bits average",
                        realised=average(result.state, sizes, values))
        finally:
            db.close()
        return self.result(ctx, report)
