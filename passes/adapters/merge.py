"""`merge adapters [in SEL]`: fold adapters into their base weights; `unmerge` undoes it.

Merging replaces each adapter wrapper by its base layer (with W <- W + delta), so a saved model
is a plain checkpoint again. The wrapper is kept on the base layer (outside the module tree and
the state dict) so that :func:`unmerge` can restore it within the same Python session.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from surgery.passapi import (Granularity, ModulePass, PassError, PassParams, PassResult,
                             RunContext, State, StepReport, replace_module)
from surgery.passes.adapters.common import float_weight, is_linear_like
from surgery.passes.adapters.layers import AdapterLayer, BoneLinear, LoraLinear
from surgery.registry import register

_STASH = "_surgery_merged_adapter"


def _cannot_merge(path: str, layer: AdapterLayer) -> str | None:
    base = layer.base_layer
    if float_weight(base) is None:
        return (f"cannot fold a float adapter into {type(base).__name__}: the base has no float "
                "weight (packed int4/int8)")
    if isinstance(base, AdapterLayer):
        return "nested adapters: merge the inner one first"
    return None


def merge_layer(root: nn.Module, path: str) -> None:
    """Fold the adapter at ``path`` into its base weight and put the base back in its place."""
    layer = root.get_submodule(path)
    if not isinstance(layer, AdapterLayer):
        raise PassError(f"{type(layer).__name__} is not an adapter", module=path)
    reason = _cannot_merge(path, layer)
    if reason:
        raise PassError(reason, module=path)
    base = layer.base_layer
    with torch.no_grad():
        w = float_weight(base)
        w.copy_(layer.merged_weight(w))
    base.__dict__[_STASH] = layer  # plain attribute: not a submodule, not saved
    replace_module(root, path, base)


def _check_all(model: nn.Module, paths: list[str]) -> None:
    for path in paths:
        layer = model.get_submodule(path)
        if not isinstance(layer, AdapterLayer):
            raise PassError(f"{type(layer).__name__} is not an adapter", module=path)
        reason = _cannot_merge(path, layer)
        if reason:
            raise PassError(reason, module=path)


def merge_adapters(model: nn.Module, paths: list[str] | None = None) -> list[str]:
    """Fold every adapter (or those at ``paths``) into the base weights. Returns merged paths."""
    if paths is None:
        paths = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    _check_all(model, paths)  # all or nothing: never leave a half-merged model
    for path in paths:
        merge_layer(model, path)
    return list(paths)


def unmerge(model: nn.Module, paths: list[str] | None = None) -> list[str]:
    """Undo :func:`merge_adapters`: subtract each folded adapter and re-insert its wrapper.

    Adapters stay trainable as before. Returns the paths that were unmerged.
    """
    if paths is None:
        paths = [n for n, m in model.named_modules() if _STASH in m.__dict__]
    done = []
    for path in paths:
        base = model.get_submodule(path)
        layer = base.__dict__.pop(_STASH, None)
        if layer is None:
            raise PassError("no merged adapter here to unmerge", module=path)
        with torch.no_grad():
            w = float_weight(base)
            w.copy_(layer.unmerged_weight(w))
        replace_module(model, path, layer)
        done.append(path)
    return done


class MergeAdaptersParams(PassParams):
    pass


@register
class MergeAdapters(ModulePass):
    verb = "merge"
    method = "adapters"
    summary = "fold LoRA / Bone adapters into the base weights (Python API: unmerge)"
    Params = MergeAdaptersParams
    granularity = Granularity.TENSOR
    # The plan's skeleton holds the wrappers `adapt` put there. A plain linear target is allowed
    # because EVA may give a layer rank 0 at run time (no wrapper): it is skipped, with a note.
    leaf_types = (nn.Linear, LoraLinear, BoneLinear)
    accepts = frozenset({State.ADAPTED, State.MERGED, State.SWAPPED, State.LOWERED})
    requires = frozenset({State.ADAPTED})
    consumes = frozenset({State.ADAPTED})
    refusals = {
        State.QUANTIZED: "cannot fold a float adapter into packed int4/int8 weights",
        State.MASKED: "folding a dense adapter update would destroy the sparsity mask; "
                      "keep the adapter unmerged",
    }

    def is_leaf(self, module: nn.Module) -> bool:
        return isinstance(module, AdapterLayer) or is_linear_like(module)

    def check_module(self, path: str, module: nn.Module) -> str | None:
        if isinstance(module, AdapterLayer):
            return _cannot_merge(path, module)
        if is_linear_like(module):
            return None  # no adapter here at run time (EVA rank 0): skipped
        return f"{type(module).__name__} carries no adapter to merge"

    def rewrite_skeleton(self, model, targets, models):
        for path, layer in targets.items():
            if isinstance(layer, AdapterLayer):
                replace_module(model, path, layer.base_layer)
        return model

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        report = StepReport()
        skipped = [p for p, m in modules.items() if not isinstance(m, AdapterLayer)]
        modules = {p: m for p, m in modules.items() if isinstance(m, AdapterLayer)}
        if skipped:  # e.g. EVA gave the layer rank 0, so it never got an adapter
            report.notes.append(f"{len(skipped)} selected layer(s) carry no adapter, e.g. {skipped[0]}")
        _check_all(ctx.model, list(modules))
        with ctx.progress.task("merge adapters", total=len(modules)) as task:
            for path, layer in modules.items():
                w = float_weight(layer.base_layer)
                merge_layer(ctx.model, path)
                report.parameters += w.numel()
                report.per_module[path] = {"adapter": layer.kind}
                task.advance()
        report.modules = report.metrics["merged"] = len(modules)
        report.notes.append("adapters folded into the base weights "
                            "(surgery.passes.adapters.unmerge(model) restores them)")
        return self.result(ctx, report)
