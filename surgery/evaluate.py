"""Metrics for `expect` and for benchmarks: perplexity and output agreement."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.modelcall import first_output, forward_ids
from surgery.passapi import module_device

# windows per forward: the streamed evaluator (surgery/executor/evaluate.py) groups windows the
# same way, so that both paths compute the same floats
EVAL_BATCH = 4


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return first_output(forward_ids(model, ids))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """exp(mean next-token NLL) over every window of ``tokens`` (windows, seqlen)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        ids = tokens[i:i + batch_size].to(module_device(model))
        nll = token_nll(logits_of(model, ids), ids)
        total += float(nll.sum())
        count += nll.numel()
    model.train(was_training)
    return math.exp(total / count)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every position, flattened (float32). Row by row, so the values of a
    window do not depend on the windows computed with it; a batch's sum is the sum of the
    concatenation of its windows' values."""
    logits = logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1).to(logits.device), reduction="none")


@torch.no_grad()
def outputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    was_training = model.training
    model.eval()
    outs = [logits_of(model, tokens[i:i + batch_size]).float()
            for i in range(0, tokens.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(outs)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair of output vectors (last dimension), flattened."""
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of output vectors (last dimension)."""
    return float(cosine_rows(a, b).mean())
