"""The plan simulates structure: selectors after `adapt`, `quantize`, `merge` resolve against what
will really be there, identically in `plan` and `apply`; model passes take part in the state
checks; every statement has a plan row; diagnostics of the run end of the pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.binder import structure
from surgery.diagnostics import SurgeryError
from surgery.passapi import leaves


def tiny(seed: int, inter: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=inter,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256)).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from conftest import tiny_tokenizer

    d = tmp_path_factory.mktemp("structure")
    tok = tiny_tokenizer()
    for name, seed, inter in (("a", 0, 128), ("b", 1, 128), ("odd", 2, 96)):
        tiny(seed, inter).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def script(d, body: str) -> str:
    return (f'model a = "hf:{d / "a"}"\nmodel b = "hf:{d / "b"}"\nmodel odd = "hf:{d / "odd"}"\n'
            'data calib = corpus("pydoc", samples=2, seqlen=16, eval_windows=2)\n' + body)


def errors(fn) -> list:
    with pytest.raises(SurgeryError) as e:
        fn()
    return e.value.diagnostics


Q_PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


# -- selectors after structural changes -----------------------------------------------------

def test_type_of_adapter_layers_is_found_after_adapt(dirs):
    prog = surgery.compile(script(dirs, 'adapt modules("**.q_proj") with lora(r=4)\n'
                                        "merge adapters in type(LoraLinear)\n"))
    plan = prog.plan()
    assert plan.steps[1].modules == Q_PATHS
    res = prog.apply()
    assert structure(res.model) == structure(plan.result)  # plan and apply agree
    assert not any(type(m).__name__ == "LoraLinear" for m in res.model.modules())


def test_quantizing_adapter_layers_is_refused_with_the_state_reason(dirs):
    text = script(dirs, 'adapt modules("**.q_proj") with lora(r=4)\n'
                        "quantize type(LoraLinear) to int8\n")
    for run in (lambda: surgery.compile(text).plan(), lambda: surgery.compile(text).apply()):
        d = errors(run)[0]
        assert d.code == "E0500" and d.span.line == 6 and d.labels[0].span.line == 5
        assert "given adapters at line 5" in d.message
        assert d.help.startswith("an adapter is attached; quantize the base layer before `adapt`")


def test_base_layer_resolves_identically_in_plan_and_apply(dirs):
    text = script(dirs, 'adapt modules("**.q_proj") with lora(r=4)\n'
                        'prune modules("**.base_layer") to 2:4\n')
    planned = errors(lambda: surgery.compile(text).plan())
    applied = errors(lambda: surgery.compile(text).apply())
    assert [(d.code, d.message, d.help) for d in planned] == \
        [(d.code, d.message, d.help) for d in applied]
    d = planned[0]
    assert d.code == "E0500" and "model.layers.0.self_attn.q_proj.base_layer" in d.message
    # the adapter's own layers are inside the wrapper too: `type(Linear)` does not reach them
    plan = surgery.compile(script(dirs, 'adapt modules("**.q_proj") with lora(r=4)\n'
                                        'adapt modules("**.base_layer") with lora(r=2)\n'))
    assert errors(plan.plan)[0].code == "E0500"


def test_selection_replaced_by_an_earlier_step_names_both_lines(dirs):
    text = script(dirs, 'let body = type(Linear) - modules("lm_head")\n'
                        "quantize body to int8\nquantize body to int4\n")
    d = errors(lambda: surgery.compile(text).plan())[0]
    assert d.code == "E0500" and d.span.line == 7 and d.labels[0].span.line == 6


def test_empty_selection_is_an_error_unless_allowed(dirs):
    d = errors(lambda: surgery.compile(script(
        dirs, 'quantize type(Linear) - modules("**") to int8\n')).plan())[0]
    assert d.code == "E0400" and d.message == "the selector matches no module"
    plan = surgery.compile(script(
        dirs, 'quantize type(Linear) - modules("**", allow_empty=true) to int8\n')).plan()
    assert plan.steps[0].modules == []


def test_plan_simulates_quantize_and_prune_structure(dirs):
    prog = surgery.compile(script(dirs, 'prune modules("**.mlp.up_proj") to 2:4\n'
                                        'quantize modules("**.self_attn.*_proj") to int4 using '
                                        "rtn(group=32)\n"
                                        "quantize type(SparseLinear) to int8\n"))
    plan = prog.plan()
    assert plan.steps[2].modules == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    res = prog.apply()
    assert structure(res.model) == structure(plan.result)
    assert type(plan.result.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    assert all(t.device.type == "meta" for t in plan.result.parameters())


def test_merge_result_is_the_base_architecture(dirs):
    prog = surgery.compile(script(dirs, "merge a, b using linear()\n"
                                        'quantize modules("**.q_proj") to int8\n'))
    plan = prog.plan()
    res = prog.apply()
    assert structure(res.model) == structure(plan.result)
    assert plan.states["model.layers.0.self_attn.q_proj"] == {
        s: line for s, line in plan.states["model.layers.0.self_attn.q_proj"].items()}
    assert sorted(s.value for s in plan.states["model.layers.0.self_attn.q_proj"]) == \
        ["merged", "quantized"]


def test_plan_does_not_modify_the_input_model():
    m = tiny(0)
    before = structure(m)
    w = m.model.layers[0].self_attn.q_proj.weight
    surgery.compile('adapt modules("**.q_proj") with lora(r=4)\n'
                    'quantize modules("**.k_proj") to int8\n').plan(m)
    assert structure(m) == before and m.model.layers[0].self_attn.q_proj.weight is w
    assert w.device.type == "cpu"


# -- model passes in the state machine ------------------------------------------------------

@pytest.mark.parametrize("first, past", [("quantize modules(\"**.q_proj\") to int8", "quantized"),
                                         ("prune modules(\"**.mlp.*_proj\") to 2:4", "pruned")])
def test_merge_after_quantize_or_prune_is_a_plan_error(dirs, first, past):
    text = script(dirs, first + "\nmerge a, b using linear()\n")
    d = errors(lambda: surgery.compile(text).plan())[0]
    assert d.code == "E0500" and d.span.line == 6 and d.labels[0].span.line == 5
    assert f"they were {past} at line 5" in d.message
    assert d.help in ("merging needs dense float weights; merge before quantizing",
                      "merging would fill pruned weights; merge before pruning")


def test_merge_after_merge_is_accepted(dirs):
    plan = surgery.compile(script(dirs, "merge a, b using linear()\n"
                                        "merge a, b into a using task_arithmetic()\n")).plan()
    assert len(plan.steps) == 2


def test_export_peft_needs_adapters(dirs, tmp_path):
    text = script(dirs, f'export peft "{tmp_path / "x"}"\n')
    d = errors(lambda: surgery.compile(text).plan())[0]
    assert d.code == "E0500" and "needs adapted modules" in d.message


# -- every statement has a row ----------------------------------------------------------------

def test_plan_shows_every_statement_with_real_counts(dirs, tmp_path):
    prog = surgery.compile(script(dirs, "merge a, b using linear()\n"
                                        "expect perplexity(calib) <= 2 * original\n"
                                        f'export onnx "{tmp_path / "m.onnx"}"\n'
                                        f'save "{tmp_path / "out"}"\n'))
    plan = prog.plan()
    assert [r.line for r in plan.rows] == [5, 6, 7, 8]
    merge, expect, export, save = plan.rows
    n_leaves = len(leaves(plan.result))
    params = sum(p.numel() for p in tiny(0).parameters())  # untied: embed + lm_head both count
    for row in (merge, export, save):
        assert len(row.modules) == n_leaves and row.parameters == params
    assert expect.expectation is not None and expect.modules == [] and expect.step is None
    assert [s["verb"] for s in plan.to_json()["steps"]] == ["merge", "expect", "export", "save"]


# -- codes of the run end -----------------------------------------------------------------------

def test_incompatible_models_are_e0604_at_plan_time(dirs):
    d = errors(lambda: surgery.compile(script(dirs, "merge a, odd using linear()\n")).plan())[0]
    assert d.code == "E0604" and d.span.line == 5


def test_rebinding_to_another_structure_is_e0604(dirs):
    plan = surgery.compile(script(dirs, 'quantize modules("**.q_proj") to int8\n')).plan()
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=256))
    d = errors(lambda: plan.rebind(other))[0]
    assert d.code == "E0604" and "model.layers.1" in d.message
    assert plan.rebind(tiny(0)).model is not None


def test_refusing_to_overwrite_a_foreign_directory_is_e0802(dirs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    text = script(dirs, f'quantize modules("**.q_proj") to int8\nsave "{out}"\n')
    d = errors(lambda: surgery.compile(text).apply())[0]
    assert d.code == "E0802" and d.span.line == 6
    assert (out / "notes.txt").read_text() == "keep me"


def test_lowering_without_a_gpu_is_e0803(dirs, monkeypatch):
    from surgery.passes.lower import triton as lower

    monkeypatch.setattr(lower, "cuda_available", lambda: False)
    text = script(dirs, 'quantize modules("**.q_proj") to int4 using rtn(group=32)\n'
                        "lower int4_linear to triton\n")
    d = errors(lambda: surgery.compile(text).plan())[0]
    assert d.code == "E0803" and d.span.line == 6 and "CUDA GPU" in d.message


# -- expectations ---------------------------------------------------------------------------------

def test_division_by_a_literal_zero_is_found_at_check_time(dirs):
    text = script(dirs, "expect perplexity(calib) <= original / (2 - 2)\n")
    d = errors(lambda: surgery.compile(text).check())[0]
    assert d.code == "E0214" and d.span.line == 5 and "divides by zero" in d.message
    assert text.splitlines()[4][d.span.col - 1:d.span.end_col - 1] == "2 - 2"


def test_division_by_zero_at_run_time_is_located(dirs):
    text = script(dirs, 'quantize modules("**.q_proj") to int8\n'
                        "expect perplexity(calib) <= 2 / (original - original)\n")
    surgery.compile(text).plan()  # `original` is not known before the run
    d = errors(lambda: surgery.compile(text).apply())[0]
    assert d.code == "E0214" and d.span.line == 6 and "original =" in d.message
