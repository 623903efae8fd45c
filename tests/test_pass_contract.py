"""The contract every registered pass follows (surgery/passapi.py): declared granularity, a
reachable reason for every refusal, postconditions checked after `apply`."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery import registry
from surgery.diagnostics import SurgeryError
from surgery.passapi import (Granularity, ModulePass, PassError, PassParams, PassResult,
                             RunContext, State, StepReport, carried_states)
from surgery.progress import Progress

ALL = registry.all_passes()
KEYS = [f"{p.verb}/{p.method}" for p in ALL]

GRANULARITY = {
    "quantize/rtn": "tensor", "quantize/gptq": "block",
    "prune/magnitude": "tensor", "prune/sparsegpt": "block", "prune/wanda": "block",
    "adapt/lora": "tensor", "adapt/bone": "tensor", "merge/adapters": "tensor",
    "swap/stablemax": "block", "swap/softplus": "block", "lower/triton": "model",
    "merge/linear": "tensor", "merge/task_arithmetic": "tensor", "merge/ties": "tensor",
    "merge/dare": "tensor", "merge/pcb": "tensor", "merge/widen": "tensor",
    "merge/dare_ties": "tensor", "merge/dare_linear": "tensor",
    "merge/pleas": "model", "merge/weight_matching": "model",
    "export/onnx": "model", "export/peft": "tensor", "save/surgery": "tensor",
    "compensate/eora": "block", "compensate/svd": "tensor",
    "export/gguf": "tensor",
    "prune/evopress": "model", "quantize/evopress": "model", "prune/owl": "block",
    "drop/cosine": "model", "drop/evopress": "model",
    "train/lm": "model", "train/distill": "model",
}


def tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256)).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from conftest import tiny_tokenizer

    d = tmp_path_factory.mktemp("contract")
    tok = tiny_tokenizer()
    for name, seed in (("a", 0), ("b", 1)):
        tiny(seed).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


@pytest.mark.parametrize("key", KEYS)
def test_every_pass_declares_its_granularity(key):
    cls = registry.get_pass(*key.split("/"))
    assert isinstance(cls.granularity, Granularity)
    assert cls.granularity.value == GRANULARITY[key], "update GRANULARITY with the new pass"


def test_granularity_follows_the_statement():
    M = registry.get_pass("prune", "magnitude")
    assert M(M.Params(sparsity={"n": 2, "m": 4})).granularity is Granularity.TENSOR
    refined = M(M.Params(sparsity={"n": 2, "m": 4}, data="calib", refine={}))
    assert refined.granularity is Granularity.BLOCK  # DSnoT calibrates
    L = registry.get_pass("adapt", "lora")
    assert L(L.Params(init={"data": "calib"})).granularity is Granularity.BLOCK  # EVA


def test_a_pass_without_granularity_cannot_register():
    class NoGranularity(ModulePass):
        verb, method = "prune", "no_granularity"

    with pytest.raises(ValueError, match="does not declare its granularity"):
        registry.register(NoGranularity)


def test_data_references_are_found_by_annotation_only():
    fields = {f"{p.verb}/{p.method}": p.data_fields() for p in ALL}
    assert fields["quantize/gptq"] == ["data"] and fields["prune/wanda"] == ["data"]
    assert fields["swap/softplus"] == ["data"] and fields["merge/pleas"] == ["data"]
    assert fields["quantize/rtn"] == [] and fields["save/surgery"] == []

    class Named(PassParams):  # named `data` but not annotated: not a reference
        data: str = "x"

    class P(ModulePass):
        verb, method, granularity, Params = "prune", "x", Granularity.TENSOR, Named

    assert P.data_fields() == []


# -- every refusal is produced by some script -------------------------------------------------

DECLS = 'model a = "hf:{a}"\nmodel b = "hf:{b}"\ndata calib = corpus("pydoc", samples=2, seqlen=16)\n'
# A statement that leaves `model.layers.*.self_attn.q_proj` (or the attention around it) in a state.
MAKE = {
    State.MASKED: 'prune modules("**.q_proj") to 2:4',
    State.QUANTIZED: 'quantize modules("**.q_proj") to int8',
    State.ADAPTED: 'adapt modules("**.q_proj") with lora(r=4)',
    State.SWAPPED: 'swap softmax in modules("**.self_attn") for stablemax',
    State.LOWERED: 'lower softmax to triton in modules("**.self_attn")',
    State.MERGED: "merge a, b using linear()",
}
_FAST_SEARCH = "generations=1, offspring=1, survivors=[1, 1], tokens=[8, 16], fitness_samples=2"
# The statement of each pass on those modules.
USE = {
    "quantize/rtn": 'quantize modules("**.q_proj") to int8',
    "quantize/gptq": 'quantize modules("**.q_proj") to int4 using gptq(data=calib, group=32)',
    "prune/magnitude": 'prune modules("**.q_proj") to 2:4',
    "prune/sparsegpt": 'prune modules("**.q_proj") to 2:4 using sparsegpt(data=calib)',
    "prune/wanda": 'prune modules("**.q_proj") to 2:4 using wanda(data=calib)',
    "adapt/lora": 'adapt modules("**.q_proj") with lora(r=4)',
    "adapt/bone": 'adapt modules("**.q_proj") with bone(block=16)',
    "merge/adapters": 'merge adapters in modules("**.q_proj")',
    "swap/stablemax": 'swap softmax in modules("**.self_attn") for stablemax',
    "swap/softplus": 'swap softmax in modules("**.self_attn") for softplus(reweight=true, p=15)',
    "merge/linear": "merge a, b using linear()",
    "merge/task_arithmetic": "merge a, b into a using task_arithmetic()",
    "merge/ties": "merge a, b into a using ties(density=0.5)",
    "merge/dare": "merge a, b into a using dare(p=0.5)",
    "merge/dare_ties": "merge a, b into a using dare_ties(density=0.5)",
    "merge/dare_linear": "merge a, b into a using dare_linear(density=0.5)",
    "merge/pcb": "merge a, b into a using pcb()",
    "merge/widen": "merge a, b into a using widen()",
    "merge/pleas": "merge a, b using pleas(data=calib)",
    "merge/weight_matching": "merge a, b using weight_matching()",
    "compensate/eora": 'compensate modules("**.q_proj") using eora(rank=4, data=calib)',
    "compensate/svd": 'compensate modules("**.q_proj") using svd(rank=4)',
    "prune/evopress": 'prune modules("**.q_proj") to 50% using evopress(levels=[40%, 60%], '
                      f"method=wanda, data=calib, {_FAST_SEARCH})",
    "quantize/evopress": 'quantize modules("**.q_proj") to int6 using evopress(levels=[4, 8], '
                         f"method=rtn(group=32), data=calib, {_FAST_SEARCH})",
    "prune/owl": 'prune modules("**.q_proj") to 50% using owl(method=wanda, data=calib)',
    "train/lm": 'train modules("**.q_proj") on calib for 1 step using lm(batch=2)',
    "train/distill": 'train modules("**.q_proj") on calib for 1 step using distill(batch=2)',
}
# `merge adapters` needs the adapter on top of the refused state.
BEFORE_USE = {"merge/adapters": MAKE[State.ADAPTED]}

REFUSALS = [(f"{p.verb}/{p.method}", st) for p in ALL for st in p.refusals]


@pytest.fixture
def gpu_for_plans(monkeypatch):
    """`lower` checks for a GPU at plan time; the state checks under test do not need one."""
    from surgery.passes.lower import triton as lower

    monkeypatch.setattr(lower, "cuda_available", lambda: True)
    monkeypatch.setattr(lower, "triton_installed", lambda: True)


@pytest.mark.parametrize("key, state", REFUSALS, ids=[f"{k}-{s.value}" for k, s in REFUSALS])
def test_every_refusal_is_produced_by_a_script(key, state, dirs, gpu_for_plans):
    cls = registry.get_pass(*key.split("/"))
    assert key in USE, f"no script uses {key}: add one to USE (or remove its refusals)"
    lines = [MAKE[state]] + ([BEFORE_USE[key]] if key in BEFORE_USE else []) + [USE[key]]
    text = DECLS.format(a=dirs / "a", b=dirs / "b") + "\n".join(lines) + "\n"
    with pytest.raises(SurgeryError) as e:
        surgery.compile(text).plan()
    refused = [d for d in e.value.diagnostics if d.code == "E0500"]
    assert refused, [d.message for d in e.value.diagnostics]
    d = refused[0]
    assert d.span.line == 4 + len(lines) - 1 and d.help == cls.refusals[state]
    assert d.labels and d.labels[0].span.line == 4  # names the line that made the state


def test_bone_bat_refuses_quantized_bases(dirs):
    text = DECLS.format(a=dirs / "a", b=dirs / "b") + MAKE[State.QUANTIZED] + "\n" + \
        'adapt modules("**.q_proj") with bone(block=16, variant=bat)\n'
    with pytest.raises(SurgeryError) as e:
        surgery.compile(text).plan()
    assert e.value.diagnostics[0].code == "E0500" and "bat" in e.value.diagnostics[0].help


# -- postconditions after apply ---------------------------------------------------------------

# One script per registered pass, run on a tiny model; the last statement is the pass under test.
# The statement each pass is applied with: its USE statement, except where running it needs more
# (wanda at 50%, merge adapters after an adapter, PLeaS in one step) or the pass has no refusals.
APPLY = USE | {
    "prune/wanda": 'prune modules("**.q_proj") to 50% using wanda(data=calib)',
    "merge/adapters": 'adapt modules("**.q_proj") with lora(r=4)\nmerge adapters',
    "merge/pleas": "merge a, b using pleas(data=calib, steps=1)",
    "export/onnx": 'export onnx "{out}/m.onnx"',
    "export/peft": 'adapt modules("**.q_proj") with lora(r=4)\nexport peft "{out}/peft"',
    "save/surgery": 'save "{out}/saved"',
    # compensate needs a compressed layer (its refusals are the states it cannot follow)
    "compensate/eora": MAKE[State.QUANTIZED] + "\n" + USE["compensate/eora"],
    "compensate/svd": MAKE[State.MASKED] + "\n" + USE["compensate/svd"],
    "drop/cosine": 'drop 1 of modules("model.layers.*") using cosine(data=calib)',
    "drop/evopress": 'drop 1 of modules("model.layers.*") using evopress(data=calib, '
                     + _FAST_SEARCH + ")",
}


# export gguf: the contract models' byte-only tokenizer has no BPE merges, which llama.cpp
# cannot load (E0812); tests/test_deploy_gguf.py runs it on a tiny LLaMA whose tokenizer has.
@pytest.mark.parametrize("key", [k for k in KEYS if k not in ("lower/triton", "export/gguf")])
def test_postconditions_hold_after_apply(key, dirs, tmp_path):
    """`Pass.run` checks the generic postcondition (and the pass's own); here the produced state
    is also checked independently on the model the run returns."""
    assert key in APPLY, f"add a script for {key} to APPLY"
    cls = registry.get_pass(*key.split("/"))
    text = DECLS.format(a=dirs / "a", b=dirs / "b") + APPLY[key].format(out=tmp_path) + "\n"
    prog = surgery.compile(text)
    plan = prog.plan()
    res = prog.apply()
    row = plan.steps[-1]
    assert res.report.steps[-1].verb == cls.verb and res.report.steps[-1].method == cls.method
    for st in cls.produces - {State.MERGED}:  # MERGED leaves no trace in the module tree
        for path in row.modules:
            if cls.verb == "swap":
                assert st in carried_states(res.model.get_submodule(path))
            else:
                assert st in carried_states(res.model.get_submodule(path)), path
    for st in cls.consumes:
        assert not any(st in carried_states(m) for m in res.model.modules())


def test_postcondition_failure_is_caught(tiny_llama):
    class Lazy(ModulePass):  # claims to quantize, does nothing
        verb, method, granularity = "quantize", "lazy", Granularity.TENSOR
        produces = frozenset({State.QUANTIZED})

        def apply(self, ctx, targets):
            return self.result(ctx, StepReport())

    ctx = RunContext(model=tiny_llama, models={}, data={}, progress=Progress())
    q = tiny_llama.model.layers[0].self_attn.q_proj
    with pytest.raises(PassError, match="without the quantized state"):
        Lazy(PassParams()).run(ctx, {"model.layers.0.self_attn.q_proj": q})


def test_preconditions_run_before_apply(tiny_llama):
    R = registry.get_pass("quantize", "rtn")
    ctx = RunContext(model=tiny_llama, models={}, data={}, progress=Progress())
    q = tiny_llama.model.layers[0].self_attn.q_proj
    with pytest.raises(PassError, match="group 24 does not divide in_features 64") as e:
        R(R.Params(format="int4", group=24)).run(ctx, {"model.layers.0.self_attn.q_proj": q})
    assert e.value.module == "model.layers.0.self_attn.q_proj"
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, nn.Linear)  # untouched


def test_apply_returns_a_pass_result(tiny_llama):
    class Old(ModulePass):
        verb, method, granularity = "quantize", "old", Granularity.TENSOR

        def apply(self, ctx, targets):
            return StepReport()

    ctx = RunContext(model=tiny_llama, models={}, data={}, progress=Progress())
    with pytest.raises(TypeError, match="must return a PassResult"):
        Old(PassParams()).run(ctx, {})
    assert PassResult(tiny_llama, StepReport()).model is tiny_llama
