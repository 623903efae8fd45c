"""EvoPress's evolutionary search over per-unit compression levels (pure: no model here).

A *unit* is what gets one level: a Linear (prune, quantize) or a decoder block (drop). Each
unit has a size (its parameter count) and a level index into a sorted list of level *values*
(sparsity in percent, bits, or 0/1 for kept/dropped). The budget is the size-weighted average of
the values, and it is kept exact: units are grouped by size, the start point meets each group's
share exactly, and every mutation is a *level switch* inside one group whose raises and lowers
cancel (so every group's sum of values, hence the weighted average, never moves).

One generation (Sieberling et al., "EvoPress", and the authors' public code): `offspring`
mutants of the parent, each 1-3 switches (biased to 1); then multi-step selection: every stage
scores the survivors on a fresh random minibatch of `tokens` calibration tokens and keeps the
best `survivors`; the parent joins the last stage (elitism), so the best fitness never rises on
the last stage's data. The fitness itself is the caller's (KL to the dense model in fitness.py).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence


class Infeasible(ValueError):
    """No assignment of the levels meets the budget exactly."""


@dataclass(frozen=True)
class Stage:
    survivors: int
    tokens: int


@dataclass
class SearchConfig:
    generations: int = 50
    offspring: int = 16
    stages: tuple[Stage, ...] = (Stage(4, 256), Stage(1, 1024))
    seed: int = 0
    max_switches: int = 3


@dataclass
class SearchResult:
    state: list[int]
    fitness: float
    generations: int
    history: list[dict] = field(default_factory=list)  # per generation: best fitness, seconds
    seconds: float = 0.0
    resumed_from: int = 0


def exact(values: Sequence[float]) -> list[Fraction]:
    """Level values as exact fractions (float noise must not break the budget's exactness)."""
    return [Fraction(v).limit_denominator(10 ** 6) for v in values]


def group_by_size(sizes: Sequence[int]) -> list[list[int]]:
    """Unit indices grouped by size, in first-seen order (mutations stay inside a group)."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return list(groups.values())


def initial_state(sizes: Sequence[int], values: Sequence[float], target: float,
                  noun: str = "units") -> list[int]:
    """Level indices whose size-weighted average value is exactly ``target``.

    Uniform when ``target`` is a level; otherwise each group starts at the level just below and
    raises units in order while the raise still fits (deterministic, so the plan-time check and
    the run agree; reports Infeasible when the group cannot hit its share exactly)."""
    vals = exact(values)
    t = Fraction(target).limit_denominator(10 ** 6)
    if t < vals[0] or t > vals[-1]:
        raise Infeasible(f"the budget {float(t):g} is outside the levels' range "
                         f"{float(vals[0]):g}..{float(vals[-1]):g}")
    below = max(i for i, v in enumerate(vals) if v <= t)
    state = [below] * len(sizes)
    for group in group_by_size(sizes):
        need = t * len(group) - vals[below] * len(group)  # the group's missing sum of values
        order = list(group)
        progress = True
        while need > 0 and progress:
            progress = False
            for u in order:
                lv = state[u]
                if lv + 1 < len(vals) and vals[lv + 1] - vals[lv] <= need:
                    need -= vals[lv + 1] - vals[lv]
                    state[u] = lv + 1
                    progress = True
                    if need == 0:
                        break
        if need != 0:
            raise Infeasible(f"{len(group)} {noun} of {sizes[group[0]]} parameters cannot average "
                             f"exactly {float(t):g} with levels "
                             f"{', '.join(f'{float(v):g}' for v in vals)}")
    return state


def average(state: Sequence[int], sizes: Sequence[int], values: Sequence[float]) -> float:
    vals = exact(values)
    total = sum(sizes)
    return float(sum(vals[lv] * s for lv, s in zip(state, sizes)) / total)


def mutate(state: list[int], groups: list[list[int]], values: Sequence[float],
           rng: random.Random, max_switches: int = 3, tries: int = 100) -> list[int] | None:
    """A level-switch mutant of ``state`` with every group's value sum unchanged, or None.

    Each switch raises one unit by one level and lowers others in the same group, one level
    each, until the raise is cancelled exactly (levels need not be evenly spaced: 4->8 bits is
    paid by four one-bit lowers)."""
    vals = exact(values)
    movable = [g for g in groups if len(g) >= 2]
    if not movable:
        return None
    k = min(rng.randint(1, max_switches), rng.randint(1, max_switches))  # biased to 1
    for _ in range(tries):
        child = list(state)
        ok = True
        for _s in range(k):
            g = rng.choices(movable, weights=[len(x) for x in movable])[0]
            ups = [u for u in g if child[u] + 1 < len(vals)]
            if not ups:
                ok = False
                break
            a = rng.choice(ups)
            debt = vals[child[a] + 1] - vals[child[a]]
            child[a] += 1
            while debt > 0:
                downs = [u for u in g if u != a and child[u] > 0
                         and vals[child[u]] - vals[child[u] - 1] <= debt]
                if not downs:
                    ok = False
                    break
                b = rng.choice(downs)
                debt -= vals[child[b]] - vals[child[b] - 1]
                child[b] -= 1
            if not ok:
                break
        if ok and child != state:
            return child
    return None


Fitness = Callable[[list[int], Sequence[int]], float]  # (state, calibration sample ids) -> loss


def run_search(start: list[int], sizes: Sequence[int], values: Sequence[float], pool: int,
               seqlen: int, fitness: Fitness, cfg: SearchConfig, *,
               checkpoint: Path | None = None, on_generation=None) -> SearchResult:
    """Evolve from ``start``. ``pool`` calibration sequences of ``seqlen`` tokens feed the
    stages; ``checkpoint`` (a JSON file) is written after every generation and resumed from."""
    groups = group_by_size(sizes)
    rng = random.Random(cfg.seed)
    parent, best, done, history = list(start), float("inf"), 0, []
    resumed = 0
    if checkpoint is not None and checkpoint.exists():
        saved = json.loads(checkpoint.read_text())
        if saved.get("key") == _key(start, sizes, values, cfg):
            parent, best, done, history = (saved["state"], saved["fitness"], saved["generation"],
                                           saved["history"])
            rng.setstate(_rng_state(saved["rng"]))
            resumed = done
    t0 = time.perf_counter()
    for gen in range(done, cfg.generations):
        tg = time.perf_counter()
        children: list[list[int]] = []
        attempts = 0
        while len(children) < cfg.offspring and attempts < cfg.offspring * 20:
            attempts += 1
            c = mutate(parent, groups, values, rng, cfg.max_switches)
            if c is not None and c not in children and c != parent:
                children.append(c)
        survivors, scores = children or [parent], []
        for si, stage in enumerate(cfg.stages):
            last = si == len(cfg.stages) - 1
            if last and parent not in survivors:
                survivors = survivors + [parent]  # elitism
            ids = _minibatch(rng, pool, seqlen, stage.tokens)
            scores = [fitness(c, ids) for c in survivors]
            order = sorted(range(len(survivors)), key=lambda i: (scores[i], i))
            keep = 1 if last else stage.survivors
            survivors = [survivors[i] for i in order[:keep]]
            scores = [scores[i] for i in order[:keep]]
        parent, best = survivors[0], scores[0]
        history.append({"generation": gen + 1, "fitness": best,
                        "seconds": round(time.perf_counter() - tg, 3)})
        if checkpoint is not None:
            checkpoint.write_text(json.dumps({
                "key": _key(start, sizes, values, cfg), "state": parent, "fitness": best,
                "generation": gen + 1, "history": history, "rng": _rng_json(rng.getstate())}))
        if on_generation is not None:
            on_generation(gen + 1, best)
    return SearchResult(parent, best, cfg.generations, history,
                        round(time.perf_counter() - t0, 3), resumed)


def _minibatch(rng: random.Random, pool: int, seqlen: int, tokens: int) -> list[tuple[int, int]]:
    """(sequence id, token count) pairs adding up to ``tokens`` (the last one truncated)."""
    n = min(pool, -(-tokens // seqlen))
    ids = rng.sample(range(pool), n)
    out, left = [], tokens
    for i in ids:
        take = min(seqlen, left)
        out.append((i, take))
        left -= take
    return out


def _key(start, sizes, values, cfg: SearchConfig) -> str:
    """What a checkpoint must match to be resumed (same problem and same search settings)."""
    return json.dumps([list(start), list(sizes), [float(v) for v in values], cfg.offspring,
                       [(s.survivors, s.tokens) for s in cfg.stages], cfg.seed, cfg.max_switches])


def _rng_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state(saved) -> tuple:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
