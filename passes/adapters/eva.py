"""EVA (Explained Variance Adaptation): a data-driven LoRA init, as PEFT implements it.

For every selected layer the inputs seen on calibration data are summarised by an incremental PCA
(one minibatch per forward; state = a few components per layer, so memory stays bounded). The top
right-singular vectors initialise lora_A; the rank budget sum(r) is redistributed across layers by
explained variance ratio, with up to round(r*rho) components per layer. Layers whose inputs are
identical (q/k/v read the same hidden states) share one SVD. A layer stops collecting once its
assigned components are stable (cosine similarity >= tau between successive updates).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import cycle
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.modelcall import forward_ids
from surgery.passapi import PassError


class IncrementalPCA:
    """Incremental PCA over row batches (sklearn/PEFT semantics, randomized SVD, fixed seed)."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.k, self.seed, self.niter = n_components, seed, niter
        self.n_seen = 0
        self.mean: torch.Tensor | None = None  # float64 running column mean
        self.var: torch.Tensor | None = None  # float64 running column variance
        self.components: torch.Tensor | None = None  # (k, d) float32, rows orthonormal
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32)
        n = x.shape[0]
        batch_sum = x.sum(0, dtype=torch.float64)
        batch_mean = batch_sum / n
        centred = x.double() - batch_mean
        batch_m2 = centred.square().sum(0)  # unnormalised variance of this batch
        total = self.n_seen + n
        if self.components is None:
            mean, var = batch_mean, batch_m2 / total
            data = centred.float()
        else:
            # Chan et al. parallel update of mean and variance.
            delta = batch_mean - self.mean
            mean = self.mean + delta * (n / total)
            var = (self.var * self.n_seen + batch_m2 + delta.square() * (self.n_seen * n / total)) / total
            correction = ((self.n_seen * n / total) ** 0.5) * (self.mean - batch_mean)
            data = torch.cat([self.singular_values[:, None] * self.components, centred.float(),
                              correction.float()[None]])
        q = min(2 * self.k, *data.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(data, q=q, niter=self.niter)
        vt = v.T  # (q, d)
        # Deterministic signs: the largest-magnitude entry of each component is positive.
        signs = torch.sign(vt.gather(1, vt.abs().argmax(1, keepdim=True)))
        signs[signs == 0] = 1
        vt = vt * signs
        self.n_seen, self.mean, self.var = total, mean, var
        self.components = vt[: self.k].contiguous()
        self.singular_values = s[: self.k].clone()
        self.explained_variance_ratio = (s[: self.k].double().square()
                                         / (var * total).sum()).float()


@dataclass
class EvaResult:
    ranks: dict[str, int]  # layer path -> assigned rank (may be 0)
    components: dict[str, torch.Tensor]  # layer path -> (rank, in) initial lora_A
    steps: int = 0  # forwards used for the SVD
    converged: bool = True
    unconverged: list[str] = field(default_factory=list)
    groups: int = 0  # SVDs actually computed (layers with equal inputs share one)


class _SvdHook:
    def __init__(self, name: str, k: int, tau: float):
        self.name, self.tau = name, tau
        self.pca = IncrementalPCA(k)
        self.converged = torch.zeros(k, dtype=torch.bool)
        self.handle = None

    @torch.no_grad()
    def __call__(self, module, args, output):
        x = args[0] if isinstance(args, tuple) else args
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] < self.pca.k:  # too few tokens for this many components: skip the batch
            return
        previous = self.pca.components
        self.pca.partial_fit(x)
        if previous is not None:
            sim = F.cosine_similarity(self.pca.components, previous, dim=1)
            self.converged = sim >= self.tau


def _fingerprint(x: torch.Tensor) -> str:
    x = x.detach().reshape(-1, x.shape[-1]).float().contiguous().cpu()
    return f"{tuple(x.shape)}:{hashlib.sha1(x.numpy().tobytes()).hexdigest()}"


def _redistribute(hooks: dict[str, _SvdHook], owner_of: dict[str, str], equal: dict[str, str],
                  budget: int, max_comp: dict[str, int]) -> dict[str, int]:
    """Pool every layer's explained-variance ratios, keep the top `budget`; a layer's new rank is
    how many of its components made it. The SVD owner of an equal-input group takes the highest
    rank of its group, so its convergence test covers every member."""
    names, values = [], []
    for name, owner in owner_of.items():
        evr = hooks[owner].pca.explained_variance_ratio[: max_comp[name]]
        names += [name] * evr.numel()
        values.append(evr)
    order = torch.argsort(torch.cat(values), descending=True, stable=True)
    counts = Counter(names[i] for i in order[:budget].tolist())
    ranks = {name: counts.get(name, 0) for name in owner_of}
    for member, owner in equal.items():
        if ranks[owner] < ranks[member]:
            ranks[owner], ranks[member] = ranks[member], ranks[owner]
    return ranks


def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    forward_ids(model, ids)


@torch.no_grad()
def eva_components(model: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int],
                   tokens: torch.Tensor, *, rho: float = 2.0, tau: float = 0.99,
                   whiten: bool = False, batch_size: int = 4, max_steps: int = 64,
                   on_step: Callable[[], None] | None = None) -> EvaResult:
    """Run EVA on ``layers`` (path -> linear-like module inside ``model``) with target ``ranks``.

    ``tokens`` (samples, seqlen) are fed in minibatches of ``batch_size``, cycling over the data
    until every layer converged or ``max_steps`` forwards were made.
    """
    if tokens.numel() == 0 or tokens.shape[0] == 0:
        raise PassError("EVA got empty calibration data", hint="give the data declaration samples")
    batches = [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    budget = sum(ranks.values())
    max_comp = {n: min(round(ranks[n] * rho), layers[n].in_features) for n in layers}
    was_training = model.training
    model.eval()
    handles = []
    try:
        # 1. one forward to find layers with identical inputs (one SVD per group)
        prints: dict[str, str] = {}
        for name, mod in layers.items():
            def hash_hook(module, args, output, name=name):
                prints.setdefault(name, _fingerprint(args[0]))
            handles.append(mod.register_forward_hook(hash_hook))
        _forward(model, batches[0])
        for h in handles:
            h.remove()
        handles.clear()
        missing = [n for n in layers if n not in prints]
        if missing:
            raise PassError("EVA saw no input for this layer during the forward pass",
                            module=missing[0], hint="the layer is not used by the model's forward")
        first_with: dict[str, str] = {}
        equal: dict[str, str] = {}  # member -> SVD owner
        for name in layers:
            owner = first_with.setdefault(prints[name], name)
            if owner != name:
                equal[name] = owner
        for member, owner in equal.items():  # equal groups share max_components
            max_comp[owner] = max(max_comp[owner], max_comp[member])
        for member, owner in equal.items():
            max_comp[member] = max_comp[owner]

        # 2. incremental SVD, one minibatch per forward, until convergence
        hooks = {n: _SvdHook(n, max_comp[n], tau) for n in layers if n not in equal}
        owner_of = {n: equal.get(n, n) for n in layers}
        for name, hook in hooks.items():
            hook.handle = layers[name].register_forward_hook(hook)
        rank_dist = dict(max_comp)
        done = {n: False for n in hooks}
        steps = 0
        for ids in cycle(batches):
            for name, hook in hooks.items():
                ok = bool(torch.all(hook.converged[: rank_dist[name]]))
                if ok and not done[name]:
                    hook.handle.remove()
                    hook.handle, done[name] = None, True
                elif done[name] and not ok:  # needs more components after a redistribution
                    hook.handle, done[name] = layers[name].register_forward_hook(hook), False
            if all(done.values()) or steps >= max_steps:
                break
            _forward(model, ids)
            steps += 1
            if on_step is not None:
                on_step()
            if all(h.pca.components is not None for h in hooks.values()):
                rank_dist = _redistribute(hooks, owner_of, equal, budget, max_comp)
        for hook in hooks.values():
            if hook.handle is not None:
                hook.handle.remove()
                hook.handle = None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    never = [n for n, h in hooks.items() if h.pca.components is None]
    if never:
        raise PassError(f"EVA got no batch with at least {max_comp[never[0]]} tokens for this layer",
                        module=never[0], hint="use more samples, a longer seqlen or a smaller rho")
    unconverged = sorted(n for n in layers
                         if not bool(torch.all(hooks[owner_of[n]].converged[: rank_dist[n]])))
    components = {}
    for name in layers:
        pca, rank = hooks[owner_of[name]].pca, rank_dist[name]
        u = pca.components[:rank].clone()
        if whiten:
            u = u / pca.singular_values[:rank].sqrt().reshape(-1, 1)
        components[name] = u
    return EvaResult(rank_dist, components, steps, not unconverged, unconverged, len(hooks))
