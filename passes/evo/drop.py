"""`drop N of SEL using evopress(data=calib)` / `using cosine(data=calib)`: remove N whole
decoder blocks and re-index the rest, so the result is a smaller ordinary checkpoint
(config.num_hidden_layers and per-layer config lists follow; plain transformers loads it).

`cosine` is the heuristic baseline (ShortGPT's block influence): drop the N blocks whose output
hidden state is most similar (cosine, averaged over calibration tokens) to their input.
`evopress` searches which N to drop (level 0 = kept, 1 = dropped; a mutation drops one block and
restores another, so exactly N are dropped), starting from the cosine choice (`init=cosine`, the
default) or a random one (`init=random`).
"""

from __future__ import annotations

import random
import time
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import field_validator

from surgery.modelcall import first_output
from surgery.passapi import (DataRef, Granularity, ModulePass, PassParams, PassResult, Problem,
                             RunContext, StepReport)
from surgery.evaluate import logits_of
from surgery.registry import register

from .common import SearchParams, dense_targets, fill_report, search


class TooManyBlocks(Problem):
    code = "E0331"


class DropParams(PassParams):
    count: int  # filled by `drop N`
    data: DataRef
    batch_size: int = 8

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"the number of blocks to drop must be a whole number >= 1 "
                             f"(got {v!r})")
        return v


class EvoDropParams(DropParams, SearchParams):
    init: Literal["cosine", "random"] = "cosine"


def _container(path: str) -> str:
    return path.rpartition(".")[0]


class DropPass(ModulePass):
    verb = "drop"
    statement_fields = frozenset({"count"})
    granularity = Granularity.MODEL
    leaf_types = ()  # the selected modules themselves are the blocks
    accepts = frozenset()  # drop before compressing: later per-layer states follow the paths
    refusals = {}

    def check_module(self, path: str, module: nn.Module) -> str | None:
        return None

    def check_targets(self, targets) -> Problem | None:
        parents = {_container(p) for p in targets}
        if len(parents) != 1 or not all(p.rpartition(".")[2].isdigit() for p in targets):
            return Problem("select decoder blocks of one list, e.g. modules(\"model.layers.*\")",
                           hint="`drop` removes whole entries of a block list")
        n = len(targets)
        if self.params.count >= n:
            return TooManyBlocks(f"cannot drop {self.params.count} blocks: the selector matches "
                                 f"{n} block{'s' if n != 1 else ''}",
                                 hint=f"drop at most {n - 1}, or select more blocks")
        return None

    def produced_on(self, targets, result):
        return []  # the dropped paths are gone, the kept ones renumbered

    def affected_parameters(self, modules) -> int:
        return 0

    def rewrite_skeleton(self, model, targets, models):
        # Which blocks go is decided at run time, but every choice leaves the same structure:
        # len - N blocks, renumbered from 0. So the plan drops the last N.
        cont = _container(next(iter(targets)))
        blocks = model.get_submodule(cont)
        keep = [blocks[i] for i in range(len(blocks) - self.params.count)]
        _install(model, cont, keep)
        return model

    def apply(self, ctx: RunContext, targets) -> PassResult:
        t0 = time.perf_counter()
        cont = _container(next(iter(targets)))
        blocks = list(ctx.model.get_submodule(cont))
        selected = [int(p.rpartition(".")[2]) for p in targets]
        report = StepReport(modules=len(targets))
        sims = block_cosines(ctx, cont, self.params.data, self.params.batch_size)
        for i in selected:
            report.per_module[f"{cont}.{i}"] = {"cosine": round(sims[i], 6)}
        dropped = self.choose(ctx, cont, blocks, selected, sims, report)
        keep = [b for i, b in enumerate(blocks) if i not in dropped]
        _install(ctx.model, cont, keep)
        for i in selected:
            report.per_module[f"{cont}.{i}"]["dropped"] = i in dropped
        report.parameters = sum(p.numel() for i in dropped for p in blocks[i].parameters())
        report.metrics.update({"dropped": sorted(dropped), "blocks_before": len(blocks),
                               "blocks_after": len(keep),
                               "seconds": round(time.perf_counter() - t0, 3)})
        return self.result(ctx, report)

    def choose(self, ctx, cont, blocks, selected, sims, report) -> set[int]:
        raise NotImplementedError


def cosine_choice(selected: list[int], sims: list[float], count: int) -> set[int]:
    """The ``count`` selected blocks that change their input least (highest cosine)."""
    return set(sorted(selected, key=lambda i: (-sims[i], i))[:count])


@register
class CosineDrop(DropPass):
    method = "cosine"
    summary = "drop the blocks whose output is most similar to their input (heuristic)"
    is_default = True
    Params = DropParams

    def choose(self, ctx, cont, blocks, selected, sims, report):
        return cosine_choice(selected, sims, self.params.count)


@register
class EvoPressDrop(DropPass):
    method = "evopress"
    summary = "choose the blocks to drop by evolutionary search (KL to the dense model)"
    Params = EvoDropParams

    def choose(self, ctx, cont, blocks, selected, sims, report):
        p: EvoDropParams = self.params
        n = p.count
        if p.init == "cosine":
            first = cosine_choice(selected, sims, n)
        else:
            rng = random.Random(p.seed if p.seed is not None else ctx.seed)
            first = set(rng.sample(selected, n))
        start = [1 if i in first else 0 for i in selected]

        def load(state: list[int]) -> None:
            gone = {i for i, lv in zip(selected, state) if lv}
            _install(ctx.model, cont, [b for i, b in enumerate(blocks) if i not in gone],
                     reindex=False)

        _install(ctx.model, cont, blocks, reindex=False)
        sizes = [sum(q.numel() for q in blocks[i].parameters()) for i in selected]
        try:
            kl = dense_targets(ctx, p)
            result = search(ctx, p, kl, start, sizes, [0.0, 1.0], load, "evopress drop")
        finally:
            _install(ctx.model, cont, blocks, reindex=False)
        names = [f"{cont}.{i}" for i in selected]
        fill_report(report, result, names, [float(lv) for lv in result.state],
                    [1 - sims[i] for i in selected], key="dropped", level_label="dropped",
                    title=f"EvoPress: {n} of {len(selected)} blocks dropped",
                    realised=sum(result.state) / len(selected),
                    error_label="1 - cosine(block input, output)")
        report.metrics["start"] = sorted(first)
        return {i for i, lv in zip(selected, result.state) if lv}


@torch.no_grad()
def block_cosines(ctx: RunContext, cont: str, data: str, batch_size: int) -> list[float]:
    """Mean cosine similarity between each block's input and output hidden states (dense
    model, calibration tokens)."""
    blocks = list(ctx.model.get_submodule(cont))
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)
    handles = []
    for i, b in enumerate(blocks):
        def hook(mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs.get("hidden_states")
            h_out = first_output(out)
            c = F.cosine_similarity(h_in.float().flatten(0, -2), h_out.float().flatten(0, -2), -1)
            sums[i] += float(c.sum())
            count[i] += c.numel()
        handles.append(b.register_forward_hook(hook, with_kwargs=True))
    was = ctx.model.training
    ctx.model.eval()
    try:
        calib = ctx.dataset(data).calibration
        for j in range(0, calib.shape[0], batch_size):
            logits_of(ctx.model, calib[j:j + batch_size])
    finally:
        for h in handles:
            h.remove()
        ctx.model.train(was)
    return [s / max(c, 1) for s, c in zip(sums, count)]


def _install(model: nn.Module, cont: str, keep: list[nn.Module], reindex: bool = True) -> None:
    """Make ``keep`` the block list at ``cont``; with ``reindex`` renumber per-block indices
    (`layer_idx`, for KV caches) and shorten the config's per-layer settings."""
    parent_path, _, name = cont.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(keep))
    if not reindex:
        return
    kept_old = [next(j for j, b in enumerate(old) if b is k) for k in keep]
    for new_i, blk in enumerate(keep):
        for mod in blk.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_i
    config = getattr(model, "config", None)
    n_before = len(old)
    for cfg in {id(c): c for c in (config, getattr(config, "text_config", None))
                if c is not None}.values():
        if getattr(cfg, "num_hidden_layers", None) == n_before:
            cfg.num_hidden_layers = len(keep)
        if not hasattr(cfg, "__dict__"):  # a plain dict config (skeletons): nothing per layer
            continue
        for key, val in list(vars(cfg).items()):
            if isinstance(val, list) and len(val) == n_before and key != "architectures":
                setattr(cfg, key, [val[j] for j in kept_old])
