"""The pass registry: built-in passes, third-party passes through entry points, unregistered
verbs and methods as clean check-time errors."""

import types

import pytest

from surgery import registry
from surgery.api import Program
from surgery.diagnostics import SurgeryError
from surgery.passapi import Granularity, ModulePass, PassParams, PassResult, StepReport


def test_builtin_passes_are_registered():
    keys = {(p.verb, p.method) for p in registry.all_passes()}
    assert ("quantize", "rtn") in keys
    assert registry.default_pass("quantize").method == "rtn"


def test_entry_point_pass_is_discovered(monkeypatch):
    class Halve(ModulePass):
        verb, method, summary = "prune", "third_party_halve", "a plugin pass"
        statement_fields = frozenset({"sparsity"})  # `to 50%` fills it
        granularity = Granularity.TENSOR

        class Params(PassParams):
            sparsity: object = None
            factor: float = 0.5

        def apply(self, ctx, modules):
            for m in modules.values():
                m.weight.data.mul_(self.params.factor)
            return PassResult(ctx.model, StepReport(modules=len(modules)))

    module = types.ModuleType("plugin_mod")
    module.Halve = Halve
    ep = types.SimpleNamespace(load=lambda: Halve, name="halve")
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group=None: [ep] if group == "surgery.passes" else [])
    try:
        assert registry.get_pass("prune", "third_party_halve") is Halve
        import torch
        import torch.nn as nn

        net = nn.Sequential(nn.Linear(4, 4))
        w = net[0].weight.detach().clone()
        res = Program("prune type(Linear) to 50% using third_party_halve(factor=0.25)\n").apply(net)
        assert (res.model[0].weight - 0.25 * w).abs().max() == 0
        assert torch.equal(net[0].weight, w)  # apply works on a copy
    finally:
        registry._PASSES.pop(("prune", "third_party_halve"), None)


def test_unknown_method_lists_registered_ones():
    with pytest.raises(SurgeryError) as e:
        Program("quantize type(Linear) to int8 using awq()\n").check()
    d = e.value.diagnostics[0]
    assert d.code == "E0201" and "registered methods: evopress, gptq, rtn" in d.help


def test_verb_without_passes_is_a_check_time_error(monkeypatch):
    saved = dict(registry._PASSES)
    monkeypatch.setattr(registry, "_PASSES", {k: v for k, v in saved.items() if k[0] != "lower"})
    with pytest.raises(SurgeryError) as e:
        Program("lower stablemax to triton\n").check()
    d = e.value.diagnostics[0]
    assert d.code == "E0203" and "quantize" in d.help
