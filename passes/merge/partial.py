"""PLeaS step 2-3: choose which matched units to merge (partial matching) and build the partially
merged network, whose permuted axes hold [merged | model-1-only | model-2-only] units."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from .permspec import PermSpec

Tensor = torch.Tensor


@dataclass
class Blocks:
    """Unit blocks of one group: merged pairs (qm of model 1 with pm of model 2) and the units
    kept separate (qs of model 1, ps of model 2)."""

    qm: Tensor
    pm: Tensor
    qs: Tensor
    ps: Tensor

    @classmethod
    def full(cls, n: int) -> "Blocks":  # an unpermuted axis: every unit merged with itself
        ar = torch.arange(n)
        e = torch.zeros(0, dtype=torch.long)
        return cls(ar, ar, e, e)

    @property
    def n_m(self) -> int:
        return int(self.qm.numel())

    @property
    def n_s(self) -> int:
        return int(self.qs.numel())

    @property
    def width(self) -> int:
        return self.n_m + 2 * self.n_s


def partial_blocks(P: Tensor, C: Tensor, r: float) -> Blocks:
    """Keep round(r*n) units separate: those whose matched pair scores lowest in C (rows = model 1
    units, columns = model 2 units in original order). r=0 merges all, r=1 none (exactly; the
    reference's quantile test still merges one unit at r=1)."""
    n = P.numel()
    n_s = int(round(r * n))
    if n_s == n:
        P = torch.arange(n)
    score = C[torch.arange(n), P]
    order = torch.argsort(-score, stable=True)
    merged = torch.sort(order[: n - n_s]).values
    sep = torch.sort(order[n - n_s:]).values
    return Blocks(merged, P[merged], sep, P[sep])


def ratios_for_width(spec: PermSpec, width: float, strategy: str = "uniform",
                     overrides: dict[str, float] | None = None) -> dict[int, float]:
    """Per-group separate fraction r_g from a width budget in [1, 2] (unit count relative to one
    model). uniform: r = width - 1 everywhere. stagewise: the deepest groups are kept separate
    first (the reference's stage-wise "zip" ratios), one boundary group partially."""
    overrides = overrides or {}
    free = [gi for gi, g in enumerate(spec.groups) if g.key not in overrides]
    r = {gi: overrides[g.key] - 1.0 for gi, g in enumerate(spec.groups) if g.key in overrides}
    if strategy == "uniform":
        r.update({gi: width - 1.0 for gi in free})
        return r
    total = sum(spec.groups[gi].size for gi in free)
    extra = (width - 1.0) * total
    for gi in reversed(free):
        n = spec.groups[gi].size
        take = min(n, max(0.0, extra))
        r[gi] = take / n
        extra -= take
    return r


def output_axis(kind: str) -> int:
    return 1 if kind == "embedding" else 0


def _segments(b: Blocks):
    """(kind, model-1 index, model-2 index) per block of an axis."""
    out = []
    if b.n_m:
        out.append(("m", b.qm, b.pm))
    if b.n_s:
        out.append(("s1", b.qs, None))
        out.append(("s2", None, b.ps))
    return out


def build_tensor(t1: Tensor, t2: Tensor, axis_blocks: dict[int, Blocks], out_ax: int) -> Tensor:
    """Partially merged tensor. Rule per block: a model takes part unless an axis is the other
    model's separate block; if the output axis block is merged both halves are averaged (so a
    separate input feeding a merged output is halved), otherwise its own model's values are
    copied; cross-model blocks are zero. Unpermuted axes count as fully merged (the [proj] rule:
    with every unit separate the network computes exactly the ensemble average)."""
    if t1.ndim == 0:
        return (t1 + t2) / 2
    blocks = [axis_blocks.get(a, Blocks.full(t1.shape[a])) for a in range(t1.ndim)]
    segs = [_segments(b) for b in blocks]
    shape = [b.width for b in blocks]
    out = torch.zeros(shape, dtype=t1.dtype)
    offsets = [list(itertools.accumulate([0] + [s[1].numel() if s[1] is not None else s[2].numel()
                                                for s in sg]))[:-1] for sg in segs]
    for combo in itertools.product(*[range(len(s)) for s in segs]):
        kinds = [segs[a][i][0] for a, i in enumerate(combo)]
        use1, use2 = "s2" not in kinds, "s1" not in kinds
        if not (use1 or use2):
            continue
        coef = 0.5 if kinds[out_ax] == "m" else 1.0
        val = None
        for use, t, pos in ((use1, t1, 1), (use2, t2, 2)):
            if not use:
                continue
            v = t
            for a, i in enumerate(combo):
                v = torch.index_select(v, a, segs[a][i][pos])
            val = coef * v if val is None else val + coef * v
        idx = tuple(slice(offsets[a][i], offsets[a][i] + val.shape[a]) for a, i in enumerate(combo))
        out[idx] = val
    return out


def effective_size(shape, axis_blocks: dict[int, Blocks]) -> int:
    """Entries outside the always-zero cross-model blocks: the compute a merged tensor costs
    (the reference's `partial_merge_flops`: a two-axis layer costs 2x at r=1, like the ensemble)."""
    blocks = [axis_blocks.get(a, Blocks.full(s)) for a, s in enumerate(shape)]
    total = 0
    for combo in itertools.product(*[_segments(b) for b in blocks]):
        kinds = [c[0] for c in combo]
        if "s1" in kinds and "s2" in kinds:
            continue
        n = 1
        for c in combo:
            n *= (c[1] if c[1] is not None else c[2]).numel()
        total += n
    return total


def head_tensor(t: Tensor, axis_blocks: dict[int, Blocks], model: int) -> Tensor:
    """A separate head of model 1 or 2 reading the merged layout: merged columns take the
    model's own matched units, its separate units pass through, the other model's are zero."""
    if not axis_blocks:
        return t.clone()
    (ax, b), = axis_blocks.items()
    own_m = b.qm if model == 1 else b.pm
    own_s = b.qs if model == 1 else b.ps
    parts = [torch.index_select(t, ax, own_m)]
    if b.n_s:
        sep = torch.index_select(t, ax, own_s)
        zero = torch.zeros_like(sep)
        parts += [sep, zero] if model == 1 else [zero, sep]
    return torch.cat(parts, dim=ax)


def resize_like(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Replace parameters/buffers whose shape changed and update the modules' size attributes,
    then load the state (module attributes stay truthful, unlike the reference)."""
    for path, mod in model.named_modules():
        pre = f"{path}." if path else ""
        changed = False
        for name, cur in list(mod.named_parameters(recurse=False)):
            new = state.get(pre + name)
            if new is not None and new.shape != cur.shape:
                setattr(mod, name, nn.Parameter(torch.empty_like(new), requires_grad=cur.requires_grad))
                changed = True
        for name, cur in list(mod.named_buffers(recurse=False)):
            new = state.get(pre + name)
            if new is not None and cur is not None and new.shape != cur.shape:
                mod.register_buffer(name, torch.empty_like(new))
                changed = True
        if not changed:
            continue
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = w.shape
        elif isinstance(mod, nn.modules.conv._ConvNd):
            mod.out_channels = w.shape[0]
            mod.in_channels = w.shape[1] * mod.groups
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = state[pre + "running_mean"].shape[0] if mod.track_running_stats \
                else w.shape[0]
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = tuple(w.shape)
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = w.shape
    model.load_state_dict(state)
