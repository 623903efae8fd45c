"""The task-vector merge: one merger, one pass class, and the named methods as rows of data.

A row names a point of sparsify x consensus x combine (recipe.py); registering a row makes a
`merge ... using NAME(...)` method whose parameters default to that point and accept every
other axis. Adding a method mergekit users know is one `Row(...)` line.

Per tensor: `T` (N, d) holds the task vectors, `sparsify` thins (and, for PCB, weights) its
rows, `combine_deltas` elects signs and combines; `theta = theta_base + scale * tau`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from pydantic import create_model

from surgery.registry import register

from .common import MergePass, TensorMerger, tensor_seed
from .dare import dare_drop
from .pcb import balanced_mean, pcb_balance
from .recipe import Recipe, TaskVectorParams
from .ties import disjoint_merge, elect_sign, ties_lean, trim_topk
from .widen import widen_merge

Tensor = torch.Tensor


def sparsify(T: Tensor, r: Recipe, seeds: Sequence[int] = (),
             shape: tuple = ()) -> tuple[Tensor, Tensor | None]:
    """(sparsified task vectors (N, d), PCB's per-entry balance weights or None). DARE draws
    each model's mask with its own seed over the tensor's shape, so any tensor order (in
    memory or streamed) gives the same bits."""
    if r.sparsify == "magnitude":
        return trim_topk(T, r.keep, r.compat), None
    if r.sparsify == "pcb":
        return pcb_balance(T, r.keep, r.clip, r.inter)
    if r.sparsify == "dare":
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            T[i] = dare_drop(T[i].view(shape), r.drop, r.rescale, g).reshape(-1)
    return T, None


def combine_deltas(T: Tensor, S: Tensor | None, weights: Sequence[float] | None,
                   r: Recipe) -> Tensor:
    """Merged task vector (d,) from task vectors T (N, d), optional per-entry weights S."""
    n = T.shape[0]
    if r.consensus == "none" and S is None:
        w = list(weights) if weights is not None else [1.0] * n
        acc = sum(wi * T[i] for i, wi in enumerate(w))  # model order, as task arithmetic adds
        if r.combine == "mean":  # a ~0 divisor counts as 1 (mergekit)
            s = sum(w)
            acc = acc / (s if abs(s) >= 1e-8 else 1.0)
        return acc
    W = S
    if weights is not None:
        Wm = torch.tensor(list(weights), dtype=T.dtype).unsqueeze(1)
        W = Wm if S is None else S * Wm
    if r.consensus == "none":  # PCB's balance weights
        return balanced_mean(T, W) if r.combine == "mean" else (T * W).sum(0)
    X = T if W is None else T * W  # mergekit elects signs on the weighted deltas
    return disjoint_merge(X, elect_sign(X), r.combine, W)


class TaskVectorMerger(TensorMerger):
    """Executes a `Recipe` per tensor (`merge`) or over the flattened model (`combine`)."""

    @property
    def recipe(self) -> Recipe:
        return self.p.recipe

    @property
    def scope(self) -> str:
        return self.recipe.scope

    def merge(self, name, base, tensors, kind):
        r = self.recipe
        if r.lean:  # computes in the inputs' precision, at least float32
            tau = ties_lean(base, list(tensors), r.keep, r.compat, r.combine, self.p.weights)
            return (base.to(tau.dtype) + tau.mul_(r.scale)).to(base.dtype)
        if r.combine == "widen" and r.sparsify == "none":  # WIDEN reads the models themselves
            return widen_merge(base, tensors, r.t, r.s, kind, r.scale)
        # Stacked task vectors are float32, as taskvec.task_vector makes them for scope=global
        # (low-precision deltas keep their bits; float64 models merge as they always have).
        b = base.float()
        T = torch.empty((len(tensors), b.numel()), dtype=b.dtype)
        for i, t in enumerate(tensors):
            torch.sub(t.float().reshape(-1), b.reshape(-1), out=T[i])
        seeds = [tensor_seed(self.seed, name, i) for i in range(len(tensors))]
        T, S = sparsify(T, r, seeds, tuple(base.shape))
        if r.combine == "widen":
            return widen_merge(base, [b + d.view(b.shape) for d in T], r.t, r.s, kind, r.scale)
        tau = combine_deltas(T, S, self.p.weights, r).view(b.shape)
        return (b + r.scale * tau).to(base.dtype)

    def combine(self, T: Tensor) -> Tensor:
        r = self.recipe
        T, S = sparsify(T, r)
        return r.scale * combine_deltas(T, S, self.p.weights, r)


class TaskVectorMerge(MergePass):
    """Base of every row: the rows differ only in `method`, `summary` and Params defaults."""

    Params = TaskVectorParams
    merger_cls = TaskVectorMerger

    def metrics(self, merger: TensorMerger) -> dict[str, Any]:
        r = merger.recipe
        return {"recipe": f"sparsify={r.sparsify} consensus={r.consensus} combine={r.combine}"}


@dataclass(frozen=True)
class Row:
    method: str
    summary: str
    sparsify: str = "none"
    consensus: str = "none"
    combine: str = "sum"
    rescale: str = "inverse_keep_prob"  # what `rescale=true` means for this row


ROWS = (
    Row("task_arithmetic", "base + lambda * sum of task vectors"),
    Row("ties", "TIES: trim task vectors to the top density, elect signs, average agreeing "
                "entries", "magnitude", "ties", "mean"),
    Row("dare", "DARE: randomly drop task-vector entries, rescale by 1/(1-p), then combine",
        "dare"),
    Row("dare_ties", "mergekit's dare_ties: DARE (L1-matched), elect signs, sum the agreeing "
                     "deltas", "dare", "ties", "sum", "l1_match"),
    Row("dare_linear", "mergekit's dare_linear: DARE (L1-matched), weighted sum of the deltas",
        "dare", "none", "sum", "l1_match"),
    Row("pcb", "PCB: balance parameter competition within and across task vectors", "pcb",
        "none", "mean"),
    Row("widen", "WIDEN: rank magnitude and direction changes per column, weight the task "
                 "vectors", combine="widen"),
)


def row_pass(row: Row) -> type[TaskVectorMerge]:
    """The registered pass of one row: TaskVectorParams with the row's defaults."""
    camel = "".join(part.title() for part in row.method.split("_"))
    fields = TaskVectorParams.model_fields
    params = create_model(f"{camel}Params", __base__=TaskVectorParams, __module__=__name__,
                          **{k: (fields[k].annotation, getattr(row, k))
                             for k in ("sparsify", "consensus", "combine", "rescale")})
    return type(f"{camel}Merge", (TaskVectorMerge,),
                {"method": row.method, "summary": row.summary, "Params": params,
                 "__module__": __name__})


PASSES = {row.method: register(row_pass(row)) for row in ROWS}
