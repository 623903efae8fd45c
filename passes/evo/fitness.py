"""KL fitness: mean per-token KL(dense || candidate) of next-token distributions on calibration
tokens. The dense model's log-probabilities are computed once per pool sequence and kept in
float16 (the target is the same for every candidate, so its rounding shifts every candidate's
fitness alike and does not change their order)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.evaluate import logits_of


class KLFitness:
    def __init__(self, model: nn.Module, pool: torch.Tensor):
        self.model = model
        self.pool = pool  # (sequences, seqlen) token ids
        self._dense: dict[int, torch.Tensor] = {}
        self.evaluations = 0

    @torch.no_grad()
    def record_dense(self) -> None:
        """Dense log-probs for every pool sequence (call while the model is still dense)."""
        for i in range(self.pool.shape[0]):
            logits = logits_of(self.model, self.pool[i:i + 1]).float()[0]
            self._dense[i] = F.log_softmax(logits, -1).to(torch.float16)

    @torch.no_grad()
    def __call__(self, batch: Sequence[tuple[int, int]]) -> float:
        total, count = 0.0, 0
        for i, n in batch:
            logits = logits_of(self.model, self.pool[i:i + 1, :n]).float()[0]
            logq = F.log_softmax(logits, -1)
            logp = self._dense[i][:n].float()
            total += float((logp.exp() * (logp - logq)).sum())
            count += n
        self.evaluations += 1
        return total / max(count, 1)


def fitness_of(load: Callable[[list[int]], None], kl: KLFitness):
    """The search's fitness: install a state, then score it."""
    def fitness(state: list[int], batch: Sequence[tuple[int, int]]) -> float:
        load(state)
        return kl(batch)
    return fitness
