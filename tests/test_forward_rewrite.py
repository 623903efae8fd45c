"""The ForwardRewrite marker base and the attention rewrite's rule table."""

from __future__ import annotations

import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.forward_rewrite import ForwardRewrite
from surgery.passes.attention.intercept import (NO_MATCH, AttentionRewrite, NormaliserSpec)


class _Scale(ForwardRewrite):
    """A toy rewrite: the parent's output times a factor."""

    marker_name = "toy_scale"

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def surgery_config(self):
        return {"factor": self.factor}

    @classmethod
    def from_surgery_config(cls, cfg):
        return cls(cfg["factor"])

    def run(self, parent, *args, **kwargs):
        self.counts.kernel += 1
        return type(parent).forward(parent, *args, **kwargs) * self.factor


def test_attach_run_uninstall_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    before = lin(x)
    marker = _Scale(2.0)
    marker.surgery_attach(lin)
    marker.surgery_attach(lin)  # idempotent: one marker, one wrapped forward
    assert list(lin._modules) == ["toy_scale"] and _Scale.of(lin) is marker
    assert torch.equal(lin(x), 2.0 * before) and marker.counts.kernel == 1
    again = _Scale.from_surgery_config(marker.surgery_config())
    assert again.factor == 2.0
    marker.uninstall(lin)
    assert _Scale.of(lin) is None and "forward" not in lin.__dict__
    assert torch.equal(lin(x), before)


def test_a_rewritten_model_still_pickles():
    lin = nn.Linear(3, 2)
    _Scale(3.0).surgery_attach(lin)
    clone = pickle.loads(pickle.dumps(lin))
    x = torch.randn(1, 3)
    assert clone.forward.__self__ is clone  # the copy's forward runs the copy
    assert torch.equal(clone(x), lin(x))


def _attention(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


def test_rules_in_front_run_first_and_no_match_falls_through():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    spec = NormaliserSpec("stablemax")
    with AttentionRewrite(spec, training=False) as plain:
        reference = _attention(q, k, v)
    assert plain.stats.rewritten == 1

    seen = []

    def observe(mode, func, args, kwargs):  # a rule that only watches
        seen.append(func)
        return NO_MATCH

    rules = [(frozenset({F.softmax}), None, observe)] + AttentionRewrite.RULES
    with AttentionRewrite(spec, training=False, rules=rules) as mode:
        out = _attention(q, k, v)
    assert seen == [F.softmax] and mode.stats.rewritten == 1
    assert torch.equal(out, reference)

    def uniform(mode, func, args, kwargs):  # a rule that handles the call itself
        x = args[0]
        return torch.full_like(x, 1.0 / x.shape[-1])

    guarded = [(frozenset({F.softmax}), lambda m, f, a, kw: a[0].shape[-1] == 5, uniform)]
    with AttentionRewrite(spec, training=False, rules=guarded + AttentionRewrite.RULES) as mode:
        out = _attention(q, k, v)
    assert mode.stats.rewritten == 0  # the base softmax rule never ran
    assert torch.allclose(out, v.mean(dim=-2, keepdim=True).expand_as(out), atol=1e-6)
