"""What the `evopress` methods share: the search parameters, running the search on a model
whose units are swapped in and out, and the report (levels per unit, search trace, chart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from pydantic import field_validator, model_validator

from surgery.passapi import DataRef, PassParams, RunContext, StepReport

from .chart import allocation_png, short
from .fitness import KLFitness, fitness_of
from .search import SearchConfig, SearchResult, Stage, run_search


class SearchParams(PassParams):
    data: DataRef
    generations: int = 50  # the generation budget
    offspring: int = 16  # mutants per generation
    survivors: list[int] = [4, 1]  # kept after each selection stage (the last keeps 1)
    tokens: list[int] = [256, 1024]  # calibration tokens each stage scores on (growing)
    fitness_samples: int = 8  # calibration sequences the fitness draws from
    seed: int | None = None  # None: the script's seed
    checkpoint: str | None = None  # a JSON file: written every generation, resumed from
    batch_size: int = 8  # calibration sequences per forward (database, statistics)
    database: str | None = None  # keep the level database in this directory and reuse it

    @field_validator("generations")
    @classmethod
    def _gens(cls, v: int) -> int:
        if v < 0:
            raise ValueError("generations must be >= 0")
        return v

    @field_validator("offspring", "fitness_samples", "batch_size")
    @classmethod
    def _pos(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return v

    @model_validator(mode="after")
    def _stages(self):
        if len(self.survivors) != len(self.tokens) or not self.tokens:
            raise ValueError("survivors and tokens need one entry per selection stage")
        if self.survivors[-1] != 1 or any(s < 1 for s in self.survivors):
            raise ValueError("each stage keeps >= 1 candidates and the last keeps exactly 1")
        if any(t < 1 for t in self.tokens):
            raise ValueError("tokens must be >= 1 per stage")
        return self

    def search_config(self, ctx_seed: int) -> SearchConfig:
        return SearchConfig(self.generations, self.offspring,
                            tuple(Stage(s, t) for s, t in zip(self.survivors, self.tokens)),
                            self.seed if self.seed is not None else ctx_seed)


def dense_targets(ctx: RunContext, params: SearchParams) -> KLFitness:
    """The fitness, with the dense model's distributions recorded (call before any change)."""
    pool = ctx.dataset(params.data).calibration[:params.fitness_samples]
    kl = KLFitness(ctx.model, pool)
    was = ctx.model.training
    ctx.model.eval()
    try:
        kl.record_dense()
    finally:
        ctx.model.train(was)
    return kl


def search(ctx: RunContext, params: SearchParams, kl: KLFitness, start: list[int],
           sizes: list[int], values: list[float], load: Callable[[list[int]], None],
           label: str) -> SearchResult:
    """Evolve ``start`` (``load`` installs a state) under the KL fitness ``kl``."""
    pool = kl.pool
    was = ctx.model.training
    ctx.model.eval()
    try:
        cfg = params.search_config(ctx.seed)
        ckpt = Path(params.checkpoint) if params.checkpoint else None
        with ctx.progress.task(f"{label}: evolutionary search", total=cfg.generations) as task:
            def on_gen(gen: int, best: float) -> None:
                task.describe(f"{label}: generation {gen}/{cfg.generations}, best KL {best:.4g}")
                task.advance()
            result = run_search(start, sizes, values, pool.shape[0], pool.shape[1],
                                fitness_of(load, kl), cfg, checkpoint=ckpt, on_generation=on_gen)
        if cfg.generations == 0 or result.fitness == float("inf"):
            ids = [(i, pool.shape[1]) for i in range(pool.shape[0])]
            load(result.state)
            result.fitness = kl(ids)
    finally:
        ctx.model.train(was)
    result.evaluations = kl.evaluations  # type: ignore[attr-defined]
    return result


def fill_report(report: StepReport, result: SearchResult, names: list[str], shown: list[float],
                errors: list[float | None], *, key: str, level_label: str, title: str,
                realised: float, error_label: str = "relative output error") -> None:
    report.metrics.update({
        "generations": result.generations, "best_kl": round(result.fitness, 6),
        "search_seconds": result.seconds, "fitness_evaluations": getattr(result, "evaluations", 0),
        f"average_{key}": round(realised, 6)})
    if result.resumed_from:
        report.notes.append(f"resumed from generation {result.resumed_from}")
    for n, v, e in zip(names, shown, errors):
        report.per_module.setdefault(n, {})[key] = v
        if e is not None:
            report.per_module[n]["error"] = round(e, 6)
    report.metrics["search_trace"] = [round(h["fitness"], 6) for h in result.history]
    try:
        report.files[f"evopress-{key}.png"] = allocation_png(
            [short(n) for n in names], shown, errors, level_label=level_label, title=title,
            error_label=error_label)
    except ImportError:  # the chart is a convenience: the levels are in the report anyway
        report.notes.append("no allocation chart: matplotlib is not installed "
                            "(pip install matplotlib)")


def build_and_search(ctx: RunContext, p: SearchParams, db, calib: torch.Tensor, modules,
                     transform, report: StepReport, *, t0: float, paths: list[str],
                     kl: KLFitness, start: list[int], sizes, values, label: str) -> SearchResult:
    """The level database (built layer-sequentially by ``transform``, or reused from disk),
    then the search over it: the part every EvoPress family shares."""
    import time

    from surgery.passes.calib import calibrate_sequential

    if db.reusable():
        report.notes.append(f"level database reused from {p.database}")
    else:
        calibrate_sequential(ctx.model, calib, modules, transform, progress=ctx.progress,
                             batch_size=p.batch_size, gram=True,
                             label="evopress: level database")
        db.finish()
    report.metrics["database_seconds"] = round(time.perf_counter() - t0, 3)
    report.metrics["database_bytes"] = db.bytes_on_disk()
    load = linear_loader(ctx.model, paths, lambda q, lv: db.get(q, lv)["weight"])
    return search(ctx, p, kl, start, sizes, values, load, label)


def linear_loader(model: nn.Module, paths: list[str], fetch: Callable[[str, int], torch.Tensor]):
    """A `load(state)` that writes each Linear's weight at its level, reading only changes."""
    current: dict[str, int] = {}

    @torch.no_grad()
    def load(state: list[int]) -> None:
        for p, lv in zip(paths, state):
            if current.get(p) != lv:
                w = model.get_submodule(p).weight
                w.copy_(fetch(p, lv).to(w.dtype))
                current[p] = lv
    return load


def level_list(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def database_key(paths: list[str], values: list[float], method: Any, calib: torch.Tensor,
                 model: nn.Module, start: list[int]) -> str:
    """What a kept database must match to be reused: the layers, levels, nested method, the
    calibration tokens and the weights (a checksum of each layer's weight)."""
    import hashlib
    import json

    h = hashlib.sha256(calib.numpy().tobytes())
    for p in paths:
        w = model.get_submodule(p).weight.detach()
        h.update(f"{p}:{float(w.double().sum()):.10e}:{float(w.double().abs().sum()):.10e}"
                 .encode())
    call = method if isinstance(method, str) else [method.name, sorted(method.kwargs.items())]
    return json.dumps([values, str(call), list(start), h.hexdigest()])


@torch.no_grad()
def start_level(mods: dict[str, nn.Module], db, level_of: dict[str, int]) -> None:
    """While the database is built, leave each finished layer at its start level, so the next
    blocks are calibrated on the inputs the start point gives them: when the budget is a level,
    the start (uniform) is then exactly the method's own layer-sequential result, and the search
    begins from that baseline."""
    for path, mod in mods.items():
        mod.weight.copy_(db.get(path, level_of[path])["weight"].to(mod.weight.dtype))
