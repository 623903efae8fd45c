"""`adapt SEL with lora(r=8, alpha=8, dropout=0, rslora=false, init=default|gaussian|eva(...))`."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgery.passapi import (CallValue, DataRef, Granularity, ModulePass, PassError, PassParams,
                             PassResult, RunContext, ShapeProblem, State, StepReport,
                             replace_module)
from surgery.passes.adapters.common import (ADAPT_ACCEPTS, ADAPT_REFUSALS, freeze_all_but_adapters,
                                            generator_for, is_linear_like, unsupported_reason)
from surgery.passes.adapters.layers import LoraLinear
from surgery.registry import register


class EvaInit(BaseModel):
    """`init=eva(data=calib, rho=2, tau=0.99, whiten=false, ...)` (PEFT's EvaConfig defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: DataRef = Field(description="the `data` declaration whose calibration split feeds the SVD")
    rho: float = Field(2.0, ge=1.0, description="max components per layer = round(r * rho)")
    tau: float = Field(0.99, ge=0.0, le=1.0, description="cosine similarity that counts as converged")
    whiten: bool = False
    adjust_alpha: bool = Field(True, description="alpha_l = alpha * rank_l / r after redistribution")
    batch_size: int = Field(4, ge=1, description="sequences per SVD minibatch")
    max_steps: int = Field(64, ge=1, description="cap on SVD forwards (PEFT has none)")


def _parse_init(value: Any) -> Any:
    if isinstance(value, CallValue):
        if value.name != "eva":
            raise ValueError(f"unknown init `{value.name}(...)`; use default, gaussian or eva(data=NAME)")
        if "data" not in value.kwargs:
            raise ValueError("eva needs calibration data: init=eva(data=NAME)")
        return EvaInit(**{k: (str(v) if k == "data" else v) for k, v in value.kwargs.items()})
    if isinstance(value, str):
        if value == "eva":
            raise ValueError("eva needs calibration data: init=eva(data=NAME)")
        if value in ("default", "gaussian"):
            return value
        raise ValueError(f"unknown init `{value}`; use default, gaussian or eva(data=NAME)")
    if isinstance(value, (EvaInit, dict)):
        return value
    raise ValueError("init must be default, gaussian or eva(data=NAME)")


class LoraParams(PassParams):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(8.0, gt=0, description="scaling = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    rslora: bool = False
    init: Literal["default", "gaussian"] | EvaInit = "default"

    @field_validator("init", mode="before")
    @classmethod
    def _init(cls, v: Any) -> Any:
        return _parse_init(v)

    @field_validator("r", mode="before")
    @classmethod
    def _r(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1:
            raise ValueError("r must be >= 1")
        return v


@register
class Lora(ModulePass):
    verb = "adapt"
    method = "lora"
    summary = "LoRA adapters (PEFT semantics): default, gaussian or EVA (data-driven) init"
    Params = LoraParams
    leaf_types = (nn.Linear,)
    accepts = ADAPT_ACCEPTS
    produces = frozenset({State.ADAPTED})
    refusals = ADAPT_REFUSALS
    granularity = Granularity.TENSOR

    def __init__(self, params: LoraParams):
        super().__init__(params)
        if isinstance(params.init, EvaInit):  # EVA's SVD runs on calibration activations
            self.granularity = Granularity.BLOCK

    def is_leaf(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def rewrite_skeleton(self, model, targets, models):
        # EVA may give a layer rank 0 (no adapter) at run time; the plan assumes every target
        # gets one, and `merge adapters` skips the layers that did not.
        p = self.params
        for path, base in targets.items():
            replace_module(model, path, LoraLinear(base, p.r, p.alpha, p.dropout, p.rslora))
        return model

    def produced_on(self, targets, result: PassResult) -> list[str]:
        return [p for p in targets if p in result.report.per_module]  # not EVA's rank-0 layers

    def check_module(self, path: str, module: nn.Module) -> str | None:
        reason = unsupported_reason("lora", module)
        if reason:
            return reason
        r = self.params.r
        if isinstance(self.params.init, EvaInit) and r > module.in_features:
            return ShapeProblem(f"r={r} exceeds in_features {module.in_features}: EVA cannot find "
                                "that many components")
        return None

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        p = self.params
        report = StepReport(modules=len(modules))
        ranks = {path: p.r for path in modules}
        alphas = {path: p.alpha for path in modules}
        given: dict[str, Any] = {}
        if isinstance(p.init, EvaInit):
            given = self._run_eva(ctx, modules, ranks, alphas, report)
        with ctx.progress.task("LoRA", total=len(modules)) as task:
            for path, base in modules.items():
                if ranks[path] == 0:  # EVA gave this layer no rank: no adapter, as in PEFT
                    task.advance()
                    continue
                layer = LoraLinear(base, ranks[path], alphas[path], p.dropout, p.rslora)
                if path in given:
                    layer.init_a("given", None, given[path])
                else:
                    layer.init_a(p.init, generator_for(ctx.seed, path))
                replace_module(ctx.model, path, layer)
                report.per_module[path] = {"r": ranks[path], "alpha": alphas[path],
                                           "scaling": layer.scaling}
                task.advance()
        trainable, total = freeze_all_but_adapters(ctx.model)
        adapted = sum(1 for r in ranks.values() if r > 0)
        report.parameters = sum(ranks[n] * (m.in_features + m.out_features)
                                for n, m in modules.items())
        report.metrics.update({"adapters": adapted, "trainable_parameters": trainable,
                               "total_parameters": total,
                               "trainable_percent": round(100.0 * trainable / max(total, 1), 4)})
        report.notes.append(f"{trainable:,} trainable parameters ({100.0 * trainable / max(total, 1):.3f} %"
                            f" of {total:,}); everything else is frozen")
        return self.result(ctx, report)

    def _run_eva(self, ctx: RunContext, modules: dict[str, nn.Module], ranks: dict[str, int],
                 alphas: dict[str, float], report: StepReport) -> dict[str, Any]:
        from surgery.passes.adapters.eva import eva_components

        eva: EvaInit = self.params.init
        if eva.data not in ctx.data:
            raise PassError(f"eva: no data named `{eva.data}`",
                            hint="declare it: data NAME = corpus(\"pydoc\", ...)")
        tokens = ctx.dataset(eva.data).calibration
        with ctx.progress.task("EVA: incremental SVD", total=eva.max_steps) as task:
            res = eva_components(ctx.model, modules, ranks, tokens, rho=eva.rho, tau=eva.tau,
                                 whiten=eva.whiten, batch_size=eva.batch_size,
                                 max_steps=eva.max_steps, on_step=task.advance)
        r, alpha = self.params.r, self.params.alpha
        for path in modules:
            ranks[path] = res.ranks[path]
            if eva.adjust_alpha and res.ranks[path] not in (0, r):
                alphas[path] = alpha * res.ranks[path] / r
        report.metrics.update({"eva_steps": res.steps, "eva_svds": res.groups,
                               "eva_converged": res.converged,
                               "rank_min": min(ranks.values()), "rank_max": max(ranks.values()),
                               "rank_budget": sum(ranks.values())})
        dropped = [n for n, k in ranks.items() if k == 0]
        if dropped:
            report.notes.append(f"EVA gave {len(dropped)} layer(s) rank 0; they get no adapter "
                                f"(e.g. {dropped[0]})")
        if not res.converged:
            report.notes.append(f"EVA hit max_steps={eva.max_steps} before {len(res.unconverged)} "
                                f"layer(s) converged (tau={eva.tau}), e.g. {res.unconverged[0]}; "
                                "their components are used as they are")
        return res.components
