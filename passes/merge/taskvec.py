"""Shared building blocks of the parameter-space merges: which tensors merge, task vectors,
scopes, and architecture checks. Pure functions over state dicts, so the in-memory pass and the
streamed engine run the same code."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence

import torch

from surgery.tying import tied_names  # noqa: F401 - the merge family imports it from here

Tensor = torch.Tensor


def is_mergeable(name: str, t: Tensor, exclude: Sequence[str] = ()) -> bool:
    """Floating tensors merge; integer buffers (step counters ...) and excluded names are copied.
    Exclusion patterns are regexes anchored at the start (`re.match`), as in the reference."""
    if not torch.is_floating_point(t):
        return False
    return not any(re.match(p, name) for p in exclude)


def compatibility_problems(named: Mapping[str, Mapping[str, tuple]]) -> list[str]:
    """`named` maps model name -> {tensor name: shape}. Return one message per mismatch, naming
    the tensors, comparing every model with the first."""
    items = list(named.items())
    if len(items) < 2:
        return []
    ref_name, ref = items[0]
    problems = []
    for name, shapes in items[1:]:
        missing = [k for k in ref if k not in shapes]
        extra = [k for k in shapes if k not in ref]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensors of `{ref_name}` are missing "
                             f"(first: {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} tensors are not in `{ref_name}` "
                             f"(first: {', '.join(extra[:3])})")
            problems.append(f"`{name}` has a different architecture from `{ref_name}`: "
                            + "; ".join(parts))
            continue
        bad = [k for k in ref if tuple(ref[k]) != tuple(shapes[k])]
        if bad:
            shown = ", ".join(f"{k} {tuple(ref[k])} vs {tuple(shapes[k])}" for k in bad[:3])
            problems.append(f"`{name}` and `{ref_name}` differ in {len(bad)} tensor shapes: "
                            f"{shown}")
    return problems


def shapes_of(model) -> dict[str, tuple]:
    """Tensor shapes of a model (works on meta skeletons)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def task_vector(base: Tensor, model: Tensor) -> Tensor:
    """tau = theta_i - theta_0, in float32 (so low-precision checkpoints do not lose the delta)."""
    return model.float() - base.float()


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return out


def merge_global(names: Sequence[str], base: Mapping[str, Tensor],
                 models: Sequence[Mapping[str, Tensor]],
                 combine: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Global scope (TIES/PCB papers): one flattened task vector per model over all `names`
    (sorted, as the reference `state_dict_to_vector`), `combine((N, d)) -> (d,)` merged delta."""
    names = sorted(names)
    T = torch.stack([flatten([task_vector(base[n], m[n]) for n in names]) for m in models])
    merged = combine(T)
    deltas = unflatten(merged, [base[n] for n in names])
    return {n: (base[n].float() + d).to(base[n].dtype) for n, d in zip(names, deltas)}


def names_in_order(state: Mapping[str, Tensor], exclude: Iterable[str] = ()) -> list[str]:
    ex = list(exclude)
    return [k for k, v in state.items() if is_mergeable(k, v, ex)]
