"""Shared Params and apply() of the two swap passes (stablemax, softplus)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from pydantic import field_validator

from surgery.diagnostics import SurgeryError
from surgery.passapi import (DataRef, Granularity, ModulePass, PassError, PassParams, PassResult,
                             Problem, RunContext, State, StepReport, register_state)

from surgery.passes.calib import calibrate_sequential

from .intercept import NormaliserSpec
from .swap import (MARKER, AttentionSwap, CannotSynthesise, _no_nested_tensors, example_inputs, install,
                   is_swapped, no_attention_reason, trace_stats)

SUPPORTED_OPS = ("softmax",)
SELECT_ATTENTION = 'select attention modules, e.g. type(LlamaAttention) or modules("**.self_attn")'


class SwapParams(PassParams):
    # Filled by the compiler from `swap <op> in SEL ...`.
    op: str = "softmax"
    # Optional data declaration: perplexity before and right after the swap goes in the report.
    data: DataRef | None = None  # name of a `data` declaration

    @field_validator("op")
    @classmethod
    def _known_op(cls, v: str) -> str:
        if v not in SUPPORTED_OPS:
            raise ValueError(f"cannot swap {v!r}: supported ops are {', '.join(SUPPORTED_OPS)}")
        return v


register_state(State.SWAPPED, is_swapped)


class SwapPass(ModulePass):
    """Base of `swap softmax in SEL for <method>`; subclasses say which normaliser."""

    statement_fields = frozenset({"op"})

    plan_needs_code = True  # check_module traces the attention forward to find the softmax
    granularity = Granularity.BLOCK  # traces each attention block, on captured inputs if needed
    collects_statistics = False  # one short sequence through the blocks, nothing per layer

    verb: ClassVar[str] = "swap"
    accepts = frozenset({State.MASKED, State.QUANTIZED, State.ADAPTED, State.MERGED})
    produces = frozenset({State.SWAPPED})
    refusals = {
        State.SWAPPED: "its softmax was already swapped",
        State.LOWERED: "it was lowered to backend kernels; swap attention before lowering",
    }

    def spec(self) -> NormaliserSpec:
        raise NotImplementedError

    # -- plan time ------------------------------------------------------------------------
    @classmethod
    def stream_refusal(cls, params: SwapParams) -> str | None:
        if params.data is not None:
            return (f"data={params.data} measures perplexity before and after the swap, which runs "
                    "the whole model at once; drop data= (and measure the saved output in a second run)")
        return None

    def check_module(self, path: str, module: nn.Module) -> str | None:
        if is_swapped(module):
            return f"softmax in {type(module).__name__} was already swapped"
        if self.params.data is not None and _is_encoder(module):
            return (f"data={self.params.data} measures perplexity, which needs a causal language "
                    f"model, and {type(module).__name__} belongs to an encoder; drop data=")
        try:
            args, kwargs = example_inputs(module)
            stats = trace_stats(module, self.spec(), args, kwargs)
        except Exception:  # noqa: BLE001 - not traceable without real inputs; checked at run time
            return None
        reason = no_attention_reason(module, stats)
        return Problem(reason, hint=SELECT_ATTENTION) if reason else None

    def rewrite_skeleton(self, model, targets, models):
        for path in _outermost(sorted(targets)):
            setattr(targets[path], MARKER, AttentionSwap(self.spec()))  # the marker child only
        return model

    def produced_on(self, targets, result: PassResult) -> list[str]:
        return _outermost(sorted(targets))  # an outer swap covers the modules inside it

    # -- run time -------------------------------------------------------------------------
    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        spec = self.spec()
        paths = _outermost(sorted(modules))
        report = StepReport()
        ds = ctx.dataset(self.params.data) if self.params.data is not None else None
        if ds is not None:
            report.metrics["perplexity_before"] = _perplexity(ctx, ds)
        # counted first: in a streamed run with a later calibrated step, that step has changed
        # these modules (e.g. q_proj -> QuantLinear) by the time the engine returns here
        report.parameters = self.affected_parameters({p: modules[p] for p in paths})
        found = self._trace_all(ctx, {p: modules[p] for p in paths}, spec)
        with ctx.progress.task(f"swap softmax for {spec.kind}", total=len(paths)) as task:
            for path in paths:
                mod = modules[path]
                if not is_swapped(mod):  # those traced in their block were swapped there
                    install(mod, spec)
                _no_nested_tensors(ctx.model, path)
                report.per_module[path] = {"class": type(mod).__name__, "softmax_rewritten": found[path].rewritten,
                                           "sdpa_decomposed": found[path].sdpa}
                task.advance()
        report.modules = len(paths)
        if ds is not None:
            report.metrics["perplexity_after"] = _perplexity(ctx, ds)
        report.notes.append(f"softmax -> {_describe(spec)} in {len(paths)} module(s)")
        if len(paths) < len(modules):
            report.notes.append(f"{len(modules) - len(paths)} selected module(s) inside another selected one "
                                "were covered by the outer swap")
        return self.result(ctx, report)

    def _trace_all(self, ctx: RunContext, targets: dict[str, nn.Module], spec: NormaliserSpec):
        """Trace every target on synthesised inputs, or on the inputs the model gives it.

        The second kind is traced, and swapped, block by block inside the calibration engine
        (``inputs=True``), so that in a streamed run (docs/scale.md) only the current block is
        resident and a later calibrated step sees the swapped blocks, as in memory. A module
        whose weights are not resident (meta: a streamed run) is always traced that way."""
        found, pending = {}, {}
        for path, mod in targets.items():
            if _on_meta(mod):
                pending[path] = mod
                continue
            try:
                args, kwargs = example_inputs(mod)
                found[path] = trace_stats(mod, spec, args, kwargs)
            except (CannotSynthesise, RuntimeError, TypeError, ValueError):
                pending[path] = mod
        for path in found:
            reason = no_attention_reason(targets[path], found[path])
            if reason:
                raise PassError(reason, module=path, hint=SELECT_ATTENTION)
        if pending:
            self._trace_in_blocks(ctx, pending, spec, found)
        return found

    def _trace_in_blocks(self, ctx: RunContext, pending: dict[str, nn.Module], spec: NormaliserSpec,
                         found: dict) -> None:
        """Trace and swap ``pending`` on the (args, kwargs) the calibration forward gives each
        one: one short sequence of the first data declaration, or 8 zero token ids."""
        ids = None
        for ds in ctx.data.values():
            ids = ds.calibration[:1, :16]
            break
        if ids is None:
            ids = torch.zeros(1, 8, dtype=torch.long)

        def transform(mods: dict[str, nn.Module], captured: dict[str, tuple]) -> None:
            for path, mod in mods.items():
                if path not in captured:
                    raise PassError(f"{type(mod).__name__} was not called when the model ran, so it cannot be "
                                    "traced", module=path, hint="select attention modules the model uses")
                args, kwargs = captured[path]
                try:
                    found[path] = trace_stats(mod, spec, args, kwargs)
                except Exception as e:  # noqa: BLE001 - reported with the module's name
                    raise PassError(f"tracing {type(mod).__name__} failed: {type(e).__name__}: {e}",
                                    module=path) from e
                reason = no_attention_reason(mod, found[path])
                if reason:
                    raise PassError(reason, module=path, hint=SELECT_ATTENTION)
                install(mod, spec)  # before the engine runs this block for the next one

        first = next(iter(pending))
        try:
            calibrate_sequential(ctx.model, ids, pending, transform, progress=ctx.progress,
                                 batch_size=1, label=f"trace attention for {spec.kind}", inputs=True)
        except (PassError, SurgeryError):
            raise
        except Exception as e:  # noqa: BLE001 - the model's own error, reported with context
            raise PassError(f"cannot trace {type(pending[first]).__name__}: example inputs could not be built from "
                            f"its signature and running the model on token ids failed ({type(e).__name__}: {e})",
                            module=first, hint="swap attention in a model that takes input_ids") from e


def _on_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in module.parameters())


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths nested inside another selected path (the outer swap covers them)."""
    out: list[str] = []
    for p in paths:
        if not any(p.startswith(q + ".") or q == "" for q in out):
            out.append(p)
    return out


def _is_encoder(module: nn.Module) -> bool:
    """True when the attention module's config says its model is not a causal LM (known at plan
    time from the skeleton, so `data=` on an encoder fails in `check`, not minutes into `apply`).
    Without a config there is nothing to go on, and the run-time check stays the guard."""
    config = getattr(module, "config", None)
    archs = getattr(config, "architectures", None) or []
    if not archs:
        return False
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return not causal and not getattr(config, "is_decoder", False)


def _perplexity(ctx: RunContext, ds) -> float:
    from surgery.evaluate import perplexity

    try:
        return round(perplexity(ctx.model, ds.evaluation), 4)
    except Exception as e:  # noqa: BLE001 - e.g. the model is not a language model
        raise PassError(f"cannot measure perplexity on this model ({type(e).__name__}: {e})",
                        hint="drop data= for models that are not causal language models") from e


def _describe(spec: NormaliserSpec) -> str:
    if spec.kind == "stablemax":
        return "stablemax"
    return f"softplus LSSAR (p={spec.p:g})" if spec.reweight else "softplus LSSA"
