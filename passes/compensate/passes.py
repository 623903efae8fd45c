"""`compensate SEL using eora(rank=32, data=calib)` / `using svd(rank=32)`: a low-rank path that
cancels the error of an already quantized and/or pruned layer (docs/passes/eora.md).

For each selected compressed layer: ``dW = W - W_c`` with ``W`` the layer's float weight in the
uncompressed model and ``W_c`` the weight it computes with now (dequantised, or the pruned
weight). ``eora`` projects ``dW`` into the eigenspace of the layer's calibration inputs
(layer-sequential on the shared calibration engine: each block sees the outputs of the already
compensated blocks before it), ``svd`` truncates ``dW`` itself. The result replaces the layer with
a ``CompensatedLinear`` (layer.py) holding the compressed layer and the factors.

The uncompressed weights come from ``ctx.extras["compensate_reference"]`` when a caller provides
the original model (benchmarks), else from reloading the subject's source (``zoo:`` / ``hf:``).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import field_validator

from surgery.passapi import (DataRef, Granularity, ModulePass, PassError, PassParams,
                             PassResult, RunContext, ShapeProblem, State, StepReport,
                             carried_states, register_state, replace_module)
from surgery.passes.compensate.layer import CompensatedLinear
from surgery.passes.compensate.lowrank import (eora_accumulated_factors, eora_factors,
                                               output_error, svd_factors)
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.registry import register
from surgery.selectors import glob_match

REFERENCE = "compensate_reference"  # ctx.extras key: the uncompressed model

register_state(State.COMPENSATED, lambda m: isinstance(m, CompensatedLinear))


def _rank_value(v: Any) -> Any:
    """``rank=32`` or a per-layer pattern ``rank=[["**.mlp.*", 64], ["**", 16]]`` (first match)."""
    if isinstance(v, bool):
        raise ValueError("rank must be a positive integer or a list of [glob, rank] pairs")
    if isinstance(v, (int, float)):
        if v != int(v) or v < 1:
            raise ValueError(f"rank must be a positive integer (got {v:g})")
        return int(v)
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError("a rank pattern needs at least one [glob, rank] pair")
        pairs = []
        for item in v:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not isinstance(item[0], str) or isinstance(item[1], bool)
                    or not isinstance(item[1], (int, float))):
                raise ValueError('each rank pattern entry is a pair ["glob", rank], e.g. '
                                 'rank=[["**.mlp.*", 64], ["**", 16]]')
            if item[1] != int(item[1]) or item[1] < 1:
                raise ValueError(f"rank for `{item[0]}` must be a positive integer")
            pairs.append((item[0], int(item[1])))
        return tuple(pairs)
    raise ValueError("rank must be a positive integer or a list of [glob, rank] pairs")


class CompensateParams(PassParams):
    rank: int | tuple[tuple[str, int], ...] = 32

    _rank = field_validator("rank", mode="before")(classmethod(lambda cls, v: _rank_value(v)))

    def rank_for(self, path: str) -> int | None:
        if isinstance(self.rank, int):
            return self.rank
        return next((r for pattern, r in self.rank if glob_match(pattern, path)), None)


class EoraParams(CompensateParams):
    data: DataRef  # calibration inputs (their covariance defines the eigenspace)
    samples: int | None = None  # use only the first N calibration samples
    batch: int = 8  # calibration sequences per forward
    # solve the layers of a block in call order, each later layer's inputs computed through the
    # already compensated earlier ones (q/k/v before o_proj, gate/up before down_proj)
    true_sequential: bool = False
    # the layer inputs the eigenspace is taken from, inside each block: "compressed" runs the
    # block's selected layers as compressed while statistics are collected, as the model will
    # run; "original" with their uncompressed weights (the public EoRA code's calibration; it
    # recovered less on SmolLM2 2:4, docs/benchmarks.md). Either way the block inputs come from
    # the already compensated blocks before it.
    within_block: Literal["compressed", "original"] = "compressed"
    # the share of the error arriving from earlier compressed layers that the path cancels too:
    # 0 = only the layer's own error (W - W_c) X (the EoRA paper); 1 = the whole gap to the
    # original model's output of the layer, W X_o (runs the original model beside the subject)
    upstream: float = 0.0
    # upstream > 0 only: ridge μ = damping · mean(diag XᵀX) (docs/passes/eora.md)
    damping: float = 0.01

    @field_validator("damping")
    @classmethod
    def _non_negative(cls, v):
        if not v >= 0:
            raise ValueError("damping must be >= 0")
        return float(v)

    @field_validator("upstream")
    @classmethod
    def _share(cls, v):
        if not 0 <= v <= 1:
            raise ValueError("upstream must be between 0 and 1 (a share of the upstream error)")
        return float(v)

    @field_validator("batch", "samples")
    @classmethod
    def _positive(cls, v, info):
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return v


def compressed_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out, in) a compressed layer computes with."""
    if isinstance(module, QuantLinear):
        return module.dequantized_weight()
    return module.weight.detach()


class CompensatePass(ModulePass):
    verb = "compensate"
    leaf_types: ClassVar[tuple[type, ...]] = (nn.Linear, QuantLinear)
    accepts = frozenset({State.QUANTIZED, State.MASKED, State.SWAPPED})
    produces = frozenset({State.COMPENSATED, State.ADAPTED})
    refusals = {
        State.ADAPTED: "the layer has an adapter; compensate the compressed layer before `adapt`",
        State.MERGED: "the layer's weights come from a merge, so the compressed layer has no "
                      "uncompressed reference to compensate towards",
        State.LOWERED: "already lowered to backend kernels; compensate before `lower`",
    }

    @classmethod
    def stream_refusal(cls, params: PassParams) -> str | None:
        # the uncompressed reference is a second whole model in memory (its weights are W, and
        # `upstream` runs it): streaming the compressed one would not bound the memory
        return ("it reads the uncompressed weights from a second, whole copy of the model in "
                "memory")

    def check_module(self, path: str, module: nn.Module) -> str | None:
        have = carried_states(module)
        if not have & {State.QUANTIZED, State.MASKED}:
            return ("not compressed: compensate follows `quantize` or `prune` on the same layer "
                    "(there is no error to cancel)")
        rank = self.params.rank_for(path)
        if rank is None:
            globs = ", ".join(f'"{g}"' for g, _ in self.params.rank)
            return ShapeProblem(f"no rank pattern matches it (patterns: {globs})")
        limit = min(module.in_features, module.out_features)
        if rank > limit:
            return ShapeProblem(f"rank {rank} exceeds min(in_features, out_features) = {limit} "
                                f"({module.out_features} x {module.in_features})")
        return None

    def rewrite_skeleton(self, model, targets, models):
        for path, base in targets.items():
            replace_module(model, path, CompensatedLinear(base, self.params.rank_for(path),
                                                          self.method))
        return model

    def affected_parameters(self, modules: dict[str, nn.Module]) -> int:
        return sum((self.params.rank_for(p) or 0) * (m.in_features + m.out_features)
                   for p, m in modules.items())

    def estimate_memory(self, modules: dict[str, nn.Module]) -> int:
        # float64: the weight error, its SVD, and (eora) the Gram matrix and its eigenvectors,
        # plus the cross-Gram matrix when the upstream error is cancelled too
        squares = 3 if getattr(self.params, "upstream", 0) > 0 else 2
        return max((8 * (3 * m.in_features * m.out_features + squares * m.in_features ** 2)
                    for m in modules.values()), default=0)

    # -- shared run-time pieces ------------------------------------------------------------------

    def reference_model(self, ctx: RunContext) -> nn.Module:
        """The uncompressed model: the caller's, or the subject's source reloaded."""
        ref = ctx.extras.get(REFERENCE)
        if ref is None:
            source = next(iter(ctx.model_sources.values()), None)
            if source is None or not source.startswith(("zoo:", "hf:")):
                raise PassError(f"compensate needs the uncompressed weights, but the model came "
                                f"from `{source}`, which cannot be reloaded",
                                hint="load the model from a `zoo:` or `hf:` source")
            from surgery.models import load_model

            with ctx.progress.task(f"reloading {source} (uncompressed weights)"):
                ref = load_model(source).model
        return ref

    def reference_weights(self, ref: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for path in paths:
            try:
                w = ref.get_submodule(path).weight
            except AttributeError:
                raise PassError(f"the uncompressed model has no layer `{path}`",
                                module=path) from None
            out[path] = w.detach().to(torch.float64).cpu()
        return out

    def compensate(self, path: str, module: nn.Module, W: torch.Tensor,
                   gram: torch.Tensor | None, results: dict[str, Any],
                   cross: torch.Tensor | None = None) -> CompensatedLinear:
        """The compensated layer; with ``cross`` (X_o X_cᵀ) the target includes the upstream
        error (``upstream``)."""
        Wc = compressed_weight(module).to(torch.float64).cpu()
        if W.shape != Wc.shape:
            raise PassError(f"the uncompressed weight is {tuple(W.shape)}, the compressed one "
                            f"{tuple(Wc.shape)}", module=path)
        dW = W - Wc
        rank = self.params.rank_for(path)
        share = None
        if cross is not None:
            (B, A), share = eora_accumulated_factors(W, Wc, gram, cross, rank,
                                                     self.params.upstream, self.params.damping)
        else:
            B, A = self.factors(dW, gram, rank)
        row: dict[str, Any] = {"rank": rank, "parameters": rank * (A.shape[1] + B.shape[0]),
                               "weight_error": float(dW.norm()),
                               "weight_error_after": float((dW - B @ A).norm())}
        if share is not None:  # the reducible part of ||W X_o - W_c X_c||² (lowrank.py)
            row["output_error_recovered"] = share
        elif gram is not None:
            before = output_error(dW, gram)
            after = output_error(dW - B @ A, gram)
            row["output_error_recovered"] = 1.0 - after / before if before > 0 else 0.0
        results[path] = row
        dev = next((t.device for t in module.buffers()), torch.device("cpu"))
        return CompensatedLinear.from_factors(module, B.to(dev), A.to(dev), self.method)

    def factors(self, dW, gram, rank):
        raise NotImplementedError

    def report(self, results: dict[str, Any], extra: dict[str, Any]) -> StepReport:
        rec = [r["output_error_recovered"] for r in results.values()
               if "output_error_recovered" in r]
        metrics = {"method": self.method, "layers": len(results),
                   "added_parameters": sum(r["parameters"] for r in results.values()), **extra}
        if rec:
            metrics["mean_output_error_recovered"] = float(sum(rec) / len(rec))
        return StepReport(modules=len(results),
                          parameters=metrics["added_parameters"], metrics=metrics,
                          per_module=results)


def _original_output(W: torch.Tensor):
    """A forward hook giving a compressed Linear the output of its uncompressed weight ``W``,
    so that the layers after it in the block see the original model's activations. The layer is
    replaced by its compensated version once solved, which drops the hook."""
    def hook(module, inputs, output):
        x = inputs[0]
        bias = getattr(module, "bias", None)
        return torch.nn.functional.linear(x, W.to(device=x.device, dtype=x.dtype),
                                          None if bias is None else bias.to(x.dtype))
    return hook


@contextlib.contextmanager
def _removing(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@register
class Eora(CompensatePass):
    method = "eora"
    summary = "EoRA: low-rank compensation of the compression error in the input eigenspace"
    Params = EoraParams
    granularity = Granularity.BLOCK
    is_default = True

    def factors(self, dW, gram, rank):
        return eora_factors(dW, gram, rank)


    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        from surgery.passes.calib import calibrate_sequential

        p: EoraParams = self.params
        ref = self.reference_model(ctx)
        W = self.reference_weights(ref, list(modules))
        accumulated = p.upstream > 0
        ds = ctx.dataset(p.data)
        calib = ds.calibration if p.samples is None else ds.calibration[:p.samples]
        results: dict[str, Any] = {}
        handles = ([m.register_forward_hook(_original_output(W[path]))
                    for path, m in modules.items()] if p.within_block == "original" else [])

        def transform(mods, stats):
            return {path: self.compensate(path, mod, W.pop(path), stats[path].gram, results,
                                          stats[path].cross)
                    for path, mod in mods.items()}

        with torch.no_grad(), _removing(handles):
            calibrate_sequential(ctx.model, calib, modules, transform, progress=ctx.progress,
                                 batch_size=p.batch, true_sequential=p.true_sequential,
                                 label=f"EoRA rank {p.rank}"
                                 if isinstance(p.rank, int) else "EoRA",
                                 reference=ref if accumulated else None)
        extra = {"calibration_samples": int(calib.shape[0]),
                 "calibration_tokens": int(calib.numel())}
        return self.result(ctx, self.report(results, extra))


@register
class Svd(CompensatePass):
    method = "svd"
    summary = "plain truncated SVD of the compression error (ZeroQuant-V2 LoRC), EoRA's baseline"
    Params = CompensateParams
    granularity = Granularity.TENSOR

    def factors(self, dW, gram, rank):
        return svd_factors(dW, rank)

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        W = self.reference_weights(self.reference_model(ctx), list(modules))
        results: dict[str, Any] = {}
        with torch.no_grad(), ctx.progress.task("SVD compensation", total=len(modules)) as t:
            for path, mod in modules.items():
                replace_module(ctx.model, path,
                               self.compensate(path, mod, W.pop(path), None, results))
                t.advance()
        return self.result(ctx, self.report(results, {}))
