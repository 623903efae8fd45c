"""PLeaS (Nasery, Hayase, Koh, Oh; CVPR 2025): match units (activations or weights), merge only
the best-matched fraction given a width budget, refit every layer by least squares against the
permuted ensemble features, then re-estimate BatchNorm statistics."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from surgery.passapi import DataRef, Granularity, PassError, PassResult, StepReport, replace_module
from surgery.registry import register

from .bn import has_batchnorm, recompute_bn_stats
from .common import MergeParams, MergePass, tensor_kinds
from .heads import ConcatHeads
from .leastsq import LayerPlan, fit_adam, fit_closed_form
from .partial import (Blocks, build_tensor, effective_size, head_tensor, output_axis, partial_blocks,
                      ratios_for_width, resize_like)
from .permspec import PermSpecError, derive_spec
from .taskvec import compatibility_problems, shapes_of, tied_names
from .weight_matching import align_to, model_batches, spec_for


def _check_width(w: float, what: str = "width") -> float:
    if not 1.0 <= w <= 2.0:
        raise ValueError(f"{what} must be in [1, 2] (1 = fully merged, 2 = fully separate), "
                         f"got {w:g}")
    return w


def build_partial_model(m1: nn.Module, m2: nn.Module, spec, blocks: dict[int, Blocks],
                        head: str | None = None) -> nn.Module:
    """Steps 2-3: the partially merged network (no fitting)."""
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    abt = spec.axes_by_tensor()
    kinds = tensor_kinds(m1)
    hp = f"{head}." if head else None
    new = {}
    for name, t1 in sd1.items():
        axes = {ax: blocks[gi] for ax, gi in abt.get(name, {}).items()}
        if hp and name.startswith(hp):
            rest = name[len(hp):]
            new[f"{hp}head1.{rest}"] = head_tensor(t1, axes, 1)
            new[f"{hp}head2.{rest}"] = head_tensor(sd2[name], axes, 2)
        elif not torch.is_floating_point(t1):
            new[name] = t1.clone()
        else:
            new[name] = build_tensor(t1, sd2[name], axes, output_axis(kinds.get(name, "")))
    merged = copy.deepcopy(m1)
    if head:
        h1, h2 = m1.get_submodule(head), m2.get_submodule(head)
        if not (isinstance(h1, nn.Linear) and isinstance(h2, nn.Linear)):
            raise PassError(f"head `{head}` must be a Linear layer in both models", module=head)
        replace_module(merged, head, ConcatHeads(copy.deepcopy(h1), copy.deepcopy(h2)))
    resize_like(merged, new)
    return merged


def _sync_config(model: nn.Module, info: dict) -> None:
    """Keep a Hugging Face config truthful when MLP blocks grew (so the model saves/reloads)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "intermediate_size"):
        return
    widths = {m.up_proj.out_features for m in model.modules()
              if type(m).__name__.endswith("MLP") and isinstance(getattr(m, "up_proj", None),
                                                                   nn.Linear)}
    if len(widths) == 1:
        cfg.intermediate_size = widths.pop()
    elif widths:
        info["notes"].append(f"MLP widths differ per layer ({min(widths)}..{max(widths)}); the "
                             "config keeps intermediate_size, reload through the surgery manifest")


def layer_plans(merged: nn.Module, m1: nn.Module, spec, blocks: dict[int, Blocks],
                head: str | None) -> list[LayerPlan]:
    abt = spec.axes_by_tensor()
    tied = set(tied_names(m1.state_dict()))
    plans = []

    def blk(name, ax, size):
        gi = abt.get(name, {}).get(ax)
        return blocks[gi] if gi is not None else Blocks.full(size)

    for path, mod in m1.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or f"{path}.weight" in tied:
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            continue
        w = f"{path}.weight"
        in_b = blk(w, 1, mod.weight.shape[1])
        if head and path == head:
            plans.append(LayerPlan(f"{path}.head1", path, path, in_b, Blocks.full(1), "m1"))
            plans.append(LayerPlan(f"{path}.head2", path, path, in_b, Blocks.full(1), "m2"))
        else:
            plans.append(LayerPlan(path, path, path, in_b, blk(w, 0, mod.weight.shape[0])))
    return plans


def pleas_merge(m1: nn.Module, m2: nn.Module, batches: list, *, width: float = 1.0,
                strategy: str = "uniform", group_widths: dict[str, float] | None = None,
                matching: str = "activation", similarity: str = "neg_l2", max_iter: int = 100,
                seed: int = 0, solver: str = "closed_form", ridge: float = 1e-4,
                steps: int = 400, lr: float = 5e-4, bn_batches: int = 100,
                head: str | None = None, least_squares: bool = True, example=None,
                progress=None) -> tuple[nn.Module, dict]:
    """Merge two models with PLeaS; `batches` are model inputs (matching, fitting, BatchNorm)."""
    m1.eval()
    m2.eval()
    ex = example if example is not None else ((batches[0],) if batches else None)
    spec = spec_for(m1, ex)
    perms, costs = align_to(spec, m1, m2, matching=matching, batches=batches,
                            similarity=similarity, max_iter=max_iter, seed=seed, progress=progress)
    ratios = ratios_for_width(spec, width, strategy, group_widths)
    blocks = {gi: partial_blocks(perms[gi], costs[gi], ratios[gi]) for gi in perms}
    merged = build_partial_model(m1, m2, spec, blocks, head)
    info = {"groups": len(spec.groups), "notes": list(spec.notes)}
    units = sum(g.size for g in spec.groups)
    info["unit_width"] = (sum(b.width for b in blocks.values()) / units) if units else 1.0
    info["group_widths"] = {g.key: round(blocks[gi].width / g.size, 4)
                            for gi, g in enumerate(spec.groups)}
    abt = spec.axes_by_tensor()
    info["compute_ratio"] = sum(
        effective_size(t.shape, {ax: blocks[gi] for ax, gi in abt.get(k, {}).items()})
        for k, t in m1.named_parameters()) / sum(t.numel() for t in m1.parameters())
    if least_squares and batches:
        plans = layer_plans(merged, m1, spec, blocks, head)
        if solver == "adam":
            with torch.enable_grad():
                hist = fit_adam(merged, m1, m2, plans, batches, steps, lr, progress)
            info["ls_loss_first_last"] = (hist[0], hist[-1]) if hist else None
        else:
            losses = fit_closed_form(merged, m1, m2, plans, batches, ridge, progress)
            info["ls_mse_before"] = sum(b for b, _ in losses.values())
            info["ls_mse_after"] = sum(a for _, a in losses.values())
    if has_batchnorm(merged) and batches:
        info["bn_batches"] = recompute_bn_stats(merged, batches, bn_batches)
    _sync_config(merged, info)
    merged.eval()
    for q in merged.parameters():
        q.requires_grad_(True)
    return merged, info


class PleasParams(MergeParams):
    data: DataRef | None = None  # names a `data` declaration
    width: float = Field(1.0, description="budget: 1 = fully merged ... 2 = ensemble")
    strategy: Literal["uniform", "stagewise"] = "uniform"
    group_widths: dict[str, float] = {}
    matching: Literal["activation", "weight"] = "activation"
    similarity: Literal["neg_l2", "inner", "pearson"] = "neg_l2"
    max_iter: int = Field(100, ge=1)
    seed: int = 0
    solver: Literal["closed_form", "adam"] = "closed_form"
    ridge: float = Field(1e-4, ge=0.0)
    steps: int = Field(400, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    batch_size: int = Field(8, ge=1)
    batches: int | None = Field(None, ge=1)
    bn_batches: int = Field(100, ge=1)
    head: str | None = None  # classifier kept separate per model (different label spaces)

    @field_validator("width")
    @classmethod
    def _w(cls, v):
        return _check_width(v)

    @field_validator("group_widths")
    @classmethod
    def _gw(cls, v):
        for k, w in v.items():
            _check_width(w, f"width of group `{k}`")
        return v

    @model_validator(mode="after")
    def _data(self):
        if self.data is None:
            raise ValueError("pleas needs data for matching and least squares: pass data=NAME")
        if self.models and len(self.models) != 2:
            raise ValueError(f"pleas merges exactly two models, got {len(self.models)}")
        return self


@register
class PleasMerge(MergePass):
    method = "pleas"
    summary = "PLeaS: partial permutation merge with a width budget, then layer-wise least squares"
    Params = PleasParams
    plan_needs_code = True  # extra_checks traces the model to derive permutation groups
    granularity = Granularity.MODEL  # matches and refits layers on whole-model activations
    # rewrite_skeleton (inherited) keeps the first model's shapes; PLeaS may widen layers, so
    # shape checks of later steps are exact only at run time, where `Pass.run` repeats them.

    def check_models(self, models):
        if self.params.head is None:
            return super().check_models(models)
        p = self.params  # separate heads may differ in their number of classes
        present = [n for n in p.models if n in models]
        hp = f"{p.head}."
        shapes = {n: {k: v for k, v in shapes_of(models[n]).items() if not k.startswith(hp)}
                  for n in present}
        probs = compatibility_problems(shapes)
        for n in present:
            if p.head not in dict(models[n].named_modules()):
                probs.append(f"`{n}` has no module `{p.head}` (head=)")
        return probs

    def extra_checks(self, models):
        try:
            derive_spec(next(iter(models.values())))
        except PermSpecError as e:
            return [f"cannot derive permutation groups: {e}"]
        except Exception:
            return []
        return []

    def apply(self, ctx, modules):
        p = self.params
        for n in p.models:
            if n not in ctx.models:
                raise PassError(f"model `{n}` is not loaded")
        if p.head is None:
            self.resolve(ctx)
        m1, m2 = (ctx.models[n] for n in p.models)
        batches = model_batches(ctx, p.data, p.batch_size, p.batches)
        merged, info = pleas_merge(
            m1, m2, batches, width=p.width, strategy=p.strategy, group_widths=dict(p.group_widths),
            matching=p.matching, similarity=p.similarity, max_iter=p.max_iter, seed=p.seed,
            solver=p.solver, ridge=p.ridge, steps=p.steps, lr=p.lr, bn_batches=p.bn_batches,
            head=p.head, progress=ctx.progress)
        notes = info.pop("notes")
        return PassResult(merged, StepReport(
            modules=2, parameters=sum(q.numel() for q in merged.parameters()),
            metrics={"width": p.width, **info}, notes=notes))
