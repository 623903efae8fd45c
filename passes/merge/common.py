"""The merge pass base class, parameters shared by every method, and the in-memory engine.

Each method supplies a `TensorMerger` (pure tensor maths: `taskvector.TaskVectorMerger` for every
task-vector row, `linear._Linear` for averaging); `MergePass`
resolves the declared models, checks that they match, merges one tensor at a time into a copy of
the reference model and assigns it to `ctx.model`. The streamed engine (`stream.py`) drives the
same mergers over safetensors shards.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
from pydantic import ConfigDict, Field, model_validator

from surgery.passapi import (Granularity, ModelPass, PassError, PassParams, PassResult, RunContext,
                             State, StepReport)
from surgery.progress import Progress
from surgery.seeding import name_seed

from .taskvec import (compatibility_problems, is_mergeable, merge_global, shapes_of, tied_names)

Tensor = torch.Tensor


def lambda_field(default: float):
    """The papers' lambda (scaling of the merged task vector). Written `scale=` in scripts;
    Python callers may also pass `lambda=` (a keyword, hence not the field name)."""
    return Field(default, alias="lambda", description="scaling of the merged task vector")


class MergeParams(PassParams):
    """Fields of every merge. `needs_base` is the one declaration of "this method merges task
    vectors": the validator below, the pass, the mergers and the streamed engine all read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True,
                              populate_by_name=True)
    needs_base: ClassVar[bool] = False
    models: list[str] = []  # filled by the compiler: `merge A, B, ...`
    base: str | None = None  # filled by the compiler: `into BASE`
    exclude: list[str] = []  # regexes (re.match) of tensor names copied from the base unmerged

    @model_validator(mode="after")
    def _check_base(self):
        if self.models and self.needs_base and self.base is None:
            raise ValueError("this method merges task vectors and needs a base model: write "
                             "`merge A, B into BASE using ...`")
        return self


class WeightedParams(MergeParams):
    """A merge with one weight per model. A subclass that divides by the sum of the weights says
    so by overriding `divides_by_weight_sum`."""

    weights: list[float] | None = None  # one per model; default 1 each

    @property
    def divides_by_weight_sum(self) -> bool:
        return False

    @model_validator(mode="after")
    def _check_weights(self):
        w = self.weights
        if w is not None and self.models and len(w) != len(self.models):
            raise ValueError(f"weights has {len(w)} entries for {len(self.models)} models")
        if w is not None and self.divides_by_weight_sum and abs(sum(w)) < 1e-12:
            raise ValueError("weights sum to 0; cannot normalize")
        return self

    def weight_list(self, n: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * n


def tensor_kinds(model: nn.Module) -> dict[str, str]:
    """Role of each parameter: 'embedding' (rows are tokens), 'matrix' (Linear, columns are
    inputs), 'conv' (weights flattened to (out, in*k)), or 'other'."""
    kinds: dict[str, str] = {}
    for path, mod in model.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(mod, nn.Embedding):
            kinds[pre + "weight"] = "embedding"
        elif isinstance(mod, nn.Linear):
            kinds[pre + "weight"] = "matrix"
        elif isinstance(mod, nn.modules.conv._ConvNd):
            kinds[pre + "weight"] = "conv"
    return kinds


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A per-(tensor, model) seed: random methods give the same result in any tensor order, so
    the streamed and in-memory engines agree bit for bit."""
    return name_seed(seed, index, name)


class TensorMerger:
    """Pure tensor maths of one method. `merge` gets the base tensor (or None) and the models'
    tensors for one name; global-scope methods implement `combine((N, d)) -> (d,)` instead."""

    scope: str = "per_tensor"
    # each output element depends only on the same element of the inputs: a streamed run may
    # merge a large tensor a block of rows at a time (executor/run.py)
    elementwise: bool = False

    def __init__(self, params: MergeParams, seed: int = 0):
        self.p = params
        self.seed = seed

    @property
    def needs_base(self) -> bool:
        return self.p.needs_base

    def merge(self, name: str, base: Tensor | None, tensors: Sequence[Tensor], kind: str) -> Tensor:
        raise NotImplementedError

    def combine(self, T: Tensor) -> Tensor:
        raise NotImplementedError


def merge_state_dicts(merger: TensorMerger, base: Mapping[str, Tensor] | None,
                      models: Sequence[Mapping[str, Tensor]], kinds: Mapping[str, str],
                      exclude: Sequence[str] = (), progress=None) -> tuple[dict[str, Tensor], int]:
    """Merge state dicts; returns (merged state dict, number of merged parameters). Tensors that
    are excluded or not floating point are copied from the base (or the first model)."""
    ref = base if base is not None else models[0]
    ties = tied_names(ref)
    names = [k for k, v in ref.items() if k not in ties and is_mergeable(k, v, exclude)]
    out: dict[str, Tensor] = {k: v for k, v in ref.items() if k not in ties}
    merged_params = 0
    if merger.scope == "global":
        out.update(merge_global(names, base, models, merger.combine))
        merged_params = sum(ref[n].numel() for n in names)
    else:
        with (progress or Progress()).task("merge", total=len(names)) as task:
            for n in names:
                out[n] = merger.merge(n, None if base is None else base[n],
                                      [m[n] for m in models], kinds.get(n, "other"))
                merged_params += out[n].numel()
                task.advance()
    for k, first in ties.items():
        out[k] = out[first]
    return out, merged_params


class MergePass(ModelPass):
    """Base of the parameter-space merge methods (`merge A, B [into BASE] using METHOD(...)`)."""

    statement_fields = frozenset({"models", "base"})

    verb = "merge"
    granularity = Granularity.TENSOR  # one tensor name at a time across the models
    produces = frozenset({State.MERGED})
    accepts = frozenset({State.MERGED})
    refusals = {State.QUANTIZED: "merging needs dense float weights; merge before quantizing",
                State.MASKED: "merging would fill pruned weights; merge before pruning",
                State.ADAPTED: "fold adapters first (`merge adapters`), then merge models"}
    Params: ClassVar[type[MergeParams]] = MergeParams
    merger_cls: ClassVar[type[TensorMerger]] = TensorMerger

    # --- plan time -----------------------------------------------------------------------
    def check_models(self, models: dict[str, nn.Module]) -> list[str]:
        # A missing base never gets here: MergeParams' validator refuses it at check time.
        p = self.params
        problems = []
        names = ([p.base] if p.base else []) + list(p.models)
        if not p.models:
            problems.append("name at least one model to merge")
            return problems
        # The checker has verified the names; compare the skeletons we were given.
        present = [n for n in dict.fromkeys(names) if n in models]
        problems += compatibility_problems({n: shapes_of(models[n]) for n in present})
        if not problems:
            problems += self.extra_checks({n: models[n] for n in present})
        return problems

    def extra_checks(self, models: dict[str, nn.Module]) -> list[str]:
        return []

    def rewrite_skeleton(self, model, targets, models):
        """The merged model has the architecture of the base (or of the first model)."""
        p = self.params
        return copy.deepcopy(models[p.base or p.models[0]])

    # --- run time ------------------------------------------------------------------------
    def resolve(self, ctx: RunContext) -> tuple[nn.Module | None, list[nn.Module]]:
        p = self.params
        for n in ([p.base] if p.base else []) + list(p.models):
            if n not in ctx.models:
                raise PassError(f"model `{n}` is not loaded", hint="declare it with `model NAME = ...`")
        base = ctx.models[p.base] if p.base else None
        models = [ctx.models[n] for n in p.models]
        if not models:
            raise PassError("name at least one model to merge")
        named = {n: shapes_of(ctx.models[n]) for n in dict.fromkeys(
            ([p.base] if p.base else []) + list(p.models))}
        probs = compatibility_problems(named)
        if probs:
            raise PassError(probs[0], hint="only models of the same architecture and shapes merge")
        return base, models

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        p = self.params
        base, models = self.resolve(ctx)
        ref = base if base is not None else models[0]
        merger = self.merger_cls(p, seed=ctx.seed)
        with torch.no_grad():
            sd, n = merge_state_dicts(
                merger, None if base is None else base.state_dict(),
                [m.state_dict() for m in models], tensor_kinds(ref), p.exclude, ctx.progress)
            out = copy.deepcopy(ref)
            out.load_state_dict(sd)
        notes = []
        if base is not None and not merger.needs_base:
            notes.append(f"`{self.method}` does not use a base; `into {p.base}` only picks the "
                         "architecture copied")
        return PassResult(out, StepReport(modules=len(models), parameters=n,
                                          metrics={"models": list(p.models), "base": p.base,
                                                   "method": self.method, **self.metrics(merger)},
                                          notes=notes))

    def metrics(self, merger: TensorMerger) -> dict[str, Any]:
        return {}
