"""Binding: selectors, skeleton plans, divisibility and state-order checks."""

import time

import pytest
import torch
import torch.nn as nn

from surgery import registry
from surgery.api import Program
from surgery.diagnostics import SurgeryError
from surgery.selectors import glob_match

HEAD = 'model base = "zoo:smollm2-135m"\nlet body = type(Linear) - modules("lm_head")\n'


@pytest.mark.parametrize("pattern, name, hit", [
    ("model.layers.*.mlp", "model.layers.3.mlp", True),
    ("model.layers.*.mlp", "model.layers.3.4.mlp", False),
    ("model.**.mlp", "model.layers.3.mlp", True),
    ("**.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("**.q_proj", "q_proj", True),
    ("model.**", "model", True),
    ("model.layers.1?.mlp", "model.layers.12.mlp", True),
    ("model.layers.1?.mlp", "model.layers.1.mlp", False),
    ("*_proj", "model.up_proj", False),
])
def test_glob_semantics(pattern, name, hit):
    assert glob_match(pattern, name) is hit


def _plan(text, model):
    return Program(text).plan(model)


def test_selector_algebra(tiny_llama):
    text = ('let a = modules("model.layers.0.**") & type(Linear) - re(".*_proj") '
            '| modules("lm_head")\nquantize a to int8\n')
    rows = _plan(text, tiny_llama).rows
    assert rows[0].modules == ["lm_head"]
    text = 'quantize re("model\\.layers\\.[01]\\.mlp\\.(up|down)_proj") to int8\n'
    assert _plan(text, tiny_llama).rows[0].modules == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_selected_container_expands_to_leaves(tiny_llama):
    rows = _plan('quantize modules("model.layers.1.mlp") to int8\n', tiny_llama).rows
    assert rows[0].modules == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                               "model.layers.1.mlp.down_proj"]


def test_allow_empty(tiny_llama):
    rows = _plan('quantize modules("nothing.here", allow_empty=true) to int8\n', tiny_llama).rows
    assert rows[0].modules == []


def test_type_matches_base_classes():
    mha = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass
    plan = Program("quantize type(Linear) to int8\n").plan(nn.Sequential(mha))
    assert plan.rows[0].modules == ["0.out_proj"]


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def _make_weights_unreadable(monkeypatch):
    """Every way surgery or transformers reads weight files raises (Python-level open of a
    weights file, safetensors' native reader, torch.load, numpy memmaps of a GGUF)."""
    import builtins
    import io

    import numpy as np
    import safetensors
    import safetensors.torch
    import transformers.modeling_utils

    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith(WEIGHT_SUFFIXES):
            raise AssertionError(f"weights were read: {file}")
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError(f"weights were read: {args[:1]}")

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    for module in (safetensors, safetensors.torch, transformers.modeling_utils):
        for name in ("safe_open", "load_file"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(np, "memmap", refuse)


def test_the_weights_guard_stops_a_real_load(tiny_hf_dir, monkeypatch):
    """The guard below is not vacuous: loading real weights under it fails."""
    from surgery.models import load_model

    _make_weights_unreadable(monkeypatch)
    with pytest.raises(SurgeryError, match="weights were read") as e:  # reported as E0603
        load_model(f"hf:{tiny_hf_dir}")
    assert e.value.diagnostics[0].code == "E0603"


def test_skeleton_plan_on_smollm2_reads_no_weights(monkeypatch):
    _make_weights_unreadable(monkeypatch)
    t0 = time.perf_counter()
    plan = Program(HEAD + "quantize body to int8\n").plan()
    elapsed = time.perf_counter() - t0
    assert plan.skeleton and plan.subject_source == "zoo:smollm2-135m"
    assert len(plan.rows[0].modules) == 210  # 30 layers x 7 projections
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536  # q,o + k,v (GQA) + MLP
    assert plan.rows[0].parameters == 30 * per_layer
    assert plan.rows[0].modules[0] == "model.layers.0.self_attn.q_proj"
    print(f"skeleton plan of SmolLM2 took {elapsed:.2f}s")


def test_plan_uses_meta_tensors():
    from surgery.models import load_skeleton

    sk = load_skeleton("zoo:smollm2-135m")
    assert all(p.device.type == "meta" for p in sk.model.parameters())
    assert sum(p.numel() for p in sk.model.parameters()) == 134515008


def test_group_must_divide_in_features_on_smollm2():
    with pytest.raises(SurgeryError) as e:
        Program(HEAD + "quantize body to int4 using rtn(group=128)\n", "g.surg").plan()
    d = e.value.diagnostics[0]
    assert d.code == "E0402" and d.span.line == 3
    text = e.value.render()
    assert "model.layers.0.self_attn.q_proj" in text and "576" in text
    assert "64" in text  # the valid groups are listed


def test_state_order_names_both_lines(tiny_llama):
    text = ('let body = type(Linear) - modules("lm_head")\nquantize body to int8\n'
            'quantize body to int4\n')
    with pytest.raises(SurgeryError) as e:
        _plan(text, tiny_llama)
    d = e.value.diagnostics[0]
    assert d.code == "E0500" and d.span.line == 3 and d.labels[0].span.line == 2
    assert "quantized at line 2" in d.message


def test_prune_after_quantize_is_refused(tiny_llama):
    assert registry.get_pass("prune", "magnitude") is not None, "the prune pass must be registered"
    text = ('let body = type(Linear) - modules("lm_head")\nquantize body to int4\n'
            'prune body to 2:4\n')
    with pytest.raises(SurgeryError) as e:
        _plan(text, tiny_llama)
    d = e.value.diagnostics[0]
    assert d.code == "E0500" and d.span.line == 3 and d.labels[0].span.line == 2


def test_plan_json(tiny_llama):
    j = _plan('quantize type(Linear) - modules("lm_head") to int8\n', tiny_llama).to_json()
    assert j["steps"][0]["method"] == "rtn" and len(j["steps"][0]["modules"]) == 14
    assert j["states"]["model.layers.0.mlp.up_proj"] == ["quantized"]
