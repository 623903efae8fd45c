"""What every prune method shares: parameters, states, bind-time checks, installing masks."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, field_validator

from surgery.passapi import (NM, CallValue, DataRef, Granularity, ModulePass, PassError,
                             PassParams, PassResult, Percent, RunContext, ShapeProblem, State,
                             StepReport, register_state, replace_module)

from surgery import distributed
from surgery.passes.calib import LinearStats, calibrate_sequential
from surgery.tying import tied_groups

from .dsnot_core import dsnot
from .masks import nm_keep, unstructured_keep
from .sparse_linear import SparseLinear
from .training import TrainingConfig, pattern_group_sizes


class DSnoTConfig(BaseModel):
    """``refine=dsnot(...)``; names and defaults as in the DSnoT reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_cycle_time: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    skip_layer: Literal["mlp", "attention", "none"] = "mlp"  # these keep the initial mask

    @field_validator("max_cycle_time")
    @classmethod
    def _cycles(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_cycle_time must be >= 1")
        return v

    @field_validator("update_threshold", "pow_of_var_regrowing")
    @classmethod
    def _nonneg(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


def _call_to_dict(v: Any, names: tuple[str, ...], what: str) -> Any:
    if isinstance(v, str):  # a bare identifier such as `refine=dsnot`
        v = CallValue(name=v)
    if isinstance(v, CallValue):
        if v.name not in names:
            raise ValueError(f"unknown {what} `{v.name}` (available: {', '.join(names)})")
        return {"method": v.name, **v.kwargs} if what == "training schedule" else dict(v.kwargs)
    return v


class PruneParams(PassParams):
    sparsity: NM | Percent
    refine: DSnoTConfig | None = None
    batch_size: int = 8  # calibration sequences per forward

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: NM | Percent) -> NM | Percent:
        if isinstance(v, NM):
            if v.m < 1:
                raise ValueError("M must be at least 1")
            if v.n < 1:
                raise ValueError("N must be at least 1 (N is the number of weights kept)")
            if v.n > v.m:
                raise ValueError(f"N must be at most M (got {v.n}:{v.m}; N weights are kept in "
                                 "every M)")
        elif not 0 <= v.value < 100:
            raise ValueError(f"sparsity must be in [0, 100) (got {v.value:g}%)")
        return v

    @field_validator("refine", mode="before")
    @classmethod
    def _refine(cls, v: Any) -> Any:
        return _call_to_dict(v, ("dsnot",), "refinement")

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int) -> int:
        if v < 1:
            raise ValueError("batch_size must be >= 1")
        return v


register_state(State.MASKED, lambda m: isinstance(m, SparseLinear))


class PrunePass(ModulePass):
    statement_fields = frozenset({"sparsity"})
    verb: ClassVar[str] = "prune"
    granularity = Granularity.BLOCK  # calibrated methods; magnitude overrides
    leaf_types = (nn.Linear,)
    accepts = frozenset({State.MASKED, State.MERGED, State.SWAPPED})
    produces = frozenset({State.MASKED})
    refusals = {
        State.QUANTIZED: "packed integer weights cannot keep a sparsity mask; prune before "
                         "quantizing",
        State.ADAPTED: "an adapter adds a dense update that would fill the pruned weights; prune "
                       "before `adapt`, or `merge adapters` first",
        State.LOWERED: "lowered modules run backend kernels that do not keep a sparsity mask; "
                       "prune before `lower`",
    }
    default_scope: ClassVar[str] = "row"

    # -- checks --------------------------------------------------------------------------------
    def group_sizes(self) -> set[int]:
        s = self.params.sparsity
        if not isinstance(s, NM):
            return set()
        return pattern_group_sizes(getattr(self.params, "training", None), s.n, s.m)

    def check_module(self, path: str, module: nn.Module) -> str | None:
        for m in sorted(self.group_sizes()):
            if module.in_features % m:
                return ShapeProblem(f"M={m} does not divide in_features {module.in_features}")
        if isinstance(module, SparseLinear) and module.training_config is not None:
            return "it is set up for sparse training; finalize the training first"
        return None

    def rewrite_skeleton(self, model, targets, models):
        n, m = self.nm
        training = getattr(self.params, "training", None)
        with torch.device("meta"):
            for path, lin in targets.items():
                if not isinstance(lin, SparseLinear):
                    replace_module(model, path, SparseLinear(
                        lin.in_features, lin.out_features, lin.bias is not None, n=n, m=m,
                        training=training, dtype=lin.weight.dtype))
        return model

    def ensures(self, model, targets, result: PassResult) -> None:
        n, m = self.nm
        if n is None or getattr(self.params, "training", None) is not None:
            return  # unstructured targets are not exact; training masks are recomputed later
        for path in targets:
            keep = model.get_submodule(path).weight_mask
            if keep.device.type == "meta":
                continue  # streamed: written already; install() checked it while resident
            _check_nm(path, keep, n, m)

    # -- running -------------------------------------------------------------------------------
    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        _refuse_tied(ctx.model, modules)
        t0 = time.perf_counter()
        self._zeros: dict[str, int] = {}  # pruned weights of each layer this process installed
        report = StepReport(modules=len(modules))
        report.metrics["pattern"] = str(self.params.sparsity)
        self.prune(ctx, modules, report)
        if getattr(self, "_split_over_ranks", False):
            # each rank installed some layers (surgery.distributed): merge what they reported
            report.per_module = distributed.merged_report(report.per_module, order=list(modules))
            swaps, ranks_with = distributed.summed([report.metrics.get("dsnot_swaps", 0),
                                                    int("dsnot_swaps" in report.metrics)])
            if ranks_with:
                report.metrics["dsnot_swaps"] = swaps
        report.metrics["seconds"] = round(time.perf_counter() - t0, 3)
        total = sum(m.weight.numel() for m in modules.values())
        zero = self._count_zeros(ctx, modules)
        report.parameters = total
        report.metrics["sparsity"] = round(zero / max(total, 1), 6)
        return self.result(ctx, report)

    def prune(self, ctx: RunContext, modules: dict[str, nn.Module], report: StepReport) -> None:
        raise NotImplementedError

    def _count_zeros(self, ctx: RunContext, modules: dict[str, nn.Module]) -> int:
        """Pruned weights of ``modules``, as install() counted them while each layer was
        resident: a streamed run (surgery/executor) has written the blocks and returned them
        to meta by now. Distributed, each rank counted the layers it solved."""
        if getattr(self, "_split_over_ranks", False):
            return distributed.summed([sum(self._zeros.values())])[0]
        if all(p in self._zeros for p in modules):
            return sum(self._zeros[p] for p in modules)
        return sum(int((~ctx.model.get_submodule(p).weight_mask).sum()) for p in modules)

    # helpers for subclasses
    @property
    def nm(self) -> tuple[int, int] | tuple[None, None]:
        s = self.params.sparsity
        return (s.n, s.m) if isinstance(s, NM) else (None, None)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep mask from scores under this statement's sparsity."""
        s = self.params.sparsity
        if isinstance(s, NM):
            return nm_keep(scores, s.n, s.m)
        scope = getattr(self.params, "scope", None) or self.default_scope
        return unstructured_keep(scores, s.fraction, scope)

    def install(self, ctx: RunContext, path: str, keep: torch.Tensor,
                weight: torch.Tensor | None = None, report: StepReport | None = None,
                training: TrainingConfig | None = None) -> SparseLinear:
        """Swap ``path`` for a SparseLinear holding ``keep`` (and ``weight`` if given)."""
        lin = ctx.model.get_submodule(path)
        n, m = self.nm
        with torch.no_grad():
            if weight is not None:
                lin.weight.copy_(weight.to(lin.weight.dtype))
            if training is None:
                lin.weight.masked_fill_(~keep.to(lin.weight.device), 0)  # +0.0 exactly
        if isinstance(lin, SparseLinear):
            lin.weight_mask.copy_(keep)
            lin.n, lin.m = n, m
            new = lin
        else:
            new = SparseLinear.from_linear(lin, keep, n=n, m=m, training=training)
            replace_module(ctx.model, path, new)
        if report is not None:
            report.per_module[path] = {"sparsity": round(new.sparsity(), 6)}
        if hasattr(self, "_zeros"):
            self._zeros[path] = int((~new.weight_mask).sum())
            if n is not None and training is None:
                _check_nm(path, new.weight_mask, n, m)
        return new

    def calibrate(self, ctx: RunContext, modules: dict[str, nn.Module], *, gram: bool,
                  transform) -> None:
        ds = ctx.dataset(getattr(self.params, "data", None))
        calibrate_sequential(ctx.model, ds.calibration, modules, transform, progress=ctx.progress,
                             batch_size=self.params.batch_size, gram=gram,
                             label=f"prune ({self.method})")
        self._split_over_ranks = distributed.current() is not None

    def refine(self, path: str, W: torch.Tensor, keep: torch.Tensor, initial: torch.Tensor,
               stats: LinearStats, report: StepReport) -> torch.Tensor:
        """DSnoT on top of ``keep`` when the statement asks for it (and the layer is not skipped)."""
        cfg = self.params.refine
        if cfg is None or layer_kind(path) == cfg.skip_layer:
            return keep
        n, m = self.nm
        wanda = W.abs().float() * stats.col_norms().float().view(1, -1)
        # x̄ as the reference accumulates it, Σ_tokens x / n_sequences, so that update_threshold
        # keeps the reference's meaning (a per-token mean would make 0.1 freeze most rows)
        xbar = (stats.sum / max(stats.samples, 1)).float()
        # Var(x) as the reference accumulates it too (mean of per-sequence variances)
        new = dsnot(W, keep, initial, wanda, xbar, stats.sequence_var().float(), n=n, m=m,
                    max_cycles=cfg.max_cycle_time, threshold=cfg.update_threshold,
                    gamma=cfg.pow_of_var_regrowing)
        swaps = int((new & ~keep).sum())
        report.metrics["dsnot_swaps"] = report.metrics.get("dsnot_swaps", 0) + swaps
        return new


def _check_nm(path: str, keep: torch.Tensor, n: int, m: int) -> None:
    if int(keep.reshape(keep.shape[0], -1, m).sum(-1).max()) > n:
        raise PassError(f"internal: `{path}` keeps more than {n} of {m}", module=path)


MLP_NAMES = {"mlp", "feed_forward", "ffn", "intermediate", "fc1", "fc2", "c_fc"}


def layer_kind(path: str) -> str:
    """'attention', 'mlp' or 'other', from the module path (LLaMA/BERT/GPT-style names)."""
    parts = path.split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in MLP_NAMES for p in parts) or "output" in parts:
        return "mlp"
    return "other"


def _refuse_tied(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    group_of = {name: group for group in tied_groups(model.named_parameters(remove_duplicate=False))
                for name in group}
    for path in modules:
        owners = [n.rpartition(".")[0] for n in group_of.get(f"{path}.weight", [])]
        others = [o for o in owners if o != path]
        if others:
            raise PassError(f"{path}.weight is tied to {others[0]}; pruning it would prune "
                            f"{others[0]} too", module=path,
                            hint=f'leave it out of the selector, e.g. `- modules("{path}")`')
