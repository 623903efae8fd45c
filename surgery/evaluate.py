"""Metrics for `expect` and for benchmarks: perplexity and output agreement."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.modelcall import first_output, forward_ids
from surgery.passapi import module_device


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return first_output(forward_ids(model, ids))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every window of ``tokens`` (windows, seqlen)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        ids = tokens[i:i + batch_size].to(module_device(model))
        logits = logits_of(model, ids).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                              ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def outputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    was_training = model.training
    model.eval()
    outs = [logits_of(model, tokens[i:i + batch_size]).float()
            for i in range(0, tokens.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(outs)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of output vectors (last dimension)."""
    return float(F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean())
