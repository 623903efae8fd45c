"""Adapters through the compiler: `.surg` scripts via surgery.compile / surgery.apply."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import surgery
from surgery.diagnostics import SurgeryError
from surgery.passes.adapters import LoraLinear, adapter_layers, trainable_parameters, unmerge

from tests.passes.test_adapters import tiny_llama, tokens

SMOL = 'model base = "zoo:smollm2-135m"\ndata calib = corpus("pydoc", samples=8, seqlen=64)\n'


def plan_errors(body: str) -> list[dict]:
    """Diagnostics of `plan` on the SmolLM2 skeleton (config only: no weights are read)."""
    with pytest.raises(SurgeryError) as info:
        surgery.compile(SMOL + body).plan()
    return [d.to_json() for d in info.value.diagnostics]


def test_bad_input_is_reported_with_line_layer_and_reason():
    errs = plan_errors('adapt modules("**.q_proj") with lora(r=0)\n'
                       'adapt modules("**.k_proj") with lora(init=eva(rho=2))\n')
    by_line = {e["location"]["line"]: e for e in errs}
    assert "r must be >= 1" in by_line[3]["message"]
    assert "eva needs calibration data" in by_line[4]["message"]

    errs = plan_errors('adapt modules("**.up_proj") with bone(block=100, variant=bat)\n'
                       'adapt modules("model.embed_tokens") with lora(r=4)\n'
                       'adapt modules("**.q_proj") with bone(block=40)\n')
    by_line = {e["location"]["line"]: e for e in errs}
    assert "model.layers.0.mlp.up_proj" in by_line[3]["message"]
    assert "bat block 100 does not divide in_features 576" in by_line[3]["message"]
    assert "model.embed_tokens" in by_line[4]["help"] and "Linear" in by_line[4]["message"]
    assert "bone block 40 does not divide in_features 576" in by_line[5]["message"]
    assert "model.layers.0.self_attn.q_proj" in by_line[5]["message"]


def test_eva_data_name_is_checked():
    errs = plan_errors('adapt modules("**.q_proj") with lora(init=eva(data=nope))\n')
    assert errs[0]["location"]["line"] == 3 and "nope" in errs[0]["message"]


def test_merge_into_int8_base_is_a_plan_error_naming_both_lines():
    errs = plan_errors('quantize modules("**.q_proj") to int8\n'
                       'adapt modules("**.q_proj") with lora(r=4)\n'
                       'merge adapters in modules("**.q_proj")\n')
    assert len(errs) == 1
    e = errs[0]
    assert e["location"]["line"] == 5 and "quantized at line 3" in e["message"]
    assert "packed int4/int8" in e["help"]
    assert e["labels"] and e["labels"][0]["location"]["line"] == 3


def test_adapt_twice_is_refused():
    errs = plan_errors('adapt modules("**.q_proj") with lora(r=4)\n'
                       'adapt modules("model.layers.0.self_attn.q_proj") with bone(block=64)\n')
    assert errs[0]["location"]["line"] == 4 and "already has an adapter" in errs[0]["help"]


def test_apply_lora_then_export_peft(tmp_path):
    model, ids = tiny_llama(), tokens(2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = tmp_path / "adapter"
    res = surgery.apply(model, f'adapt modules("**.q_proj", "**.v_proj") with lora(r=4, alpha=8)\n'
                               f'export peft "{out}"\n')
    layers = adapter_layers(res.model)
    assert len(layers) == 4 and all(isinstance(m, LoraLinear) for m in layers.values())
    step = res.report.steps[0]
    assert step.report.metrics["trainable_parameters"] == trainable_parameters(res.model) == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=ids).logits, ref)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and len(cfg["target_modules"]) == 4


def test_apply_merge_adapters_and_unmerge():
    model, ids = tiny_llama(), tokens(2)
    res = surgery.apply(model, 'adapt modules("**.up_proj") with bone(block=16)\n'
                               'adapt modules("**.q_proj") with lora(r=4)\n'
                               'merge adapters in modules("model.layers.0")\n')
    m = res.model
    assert isinstance(m.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
    assert set(adapter_layers(m)) == {"model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"}
    assert sorted(unmerge(m)) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    assert len(adapter_layers(m)) == 4


@pytest.mark.slow
def test_example_script_qlora_eva_on_smollm2(tmp_path):
    """examples/adapt_qlora_eva.surg on the real model: int8 base + EVA LoRA + PEFT export."""
    from pathlib import Path

    text = Path(__file__).resolve().parents[2].joinpath("examples", "adapt_qlora_eva.surg").read_text()
    text = text.replace('"out/smollm2-qlora-eva"', f'"{tmp_path / "adapter"}"')
    res = surgery.apply(None, text)
    assert adapter_layers(res.model)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert sum(cfg["rank_pattern"].get(t, cfg["r"]) for t in cfg["target_modules"]) <= 8 * 60


def test_save_and_load_rebuild_the_adapters(tmp_path):
    from tests.passes.test_adapters import train

    model, ids = tiny_llama(), tokens(2)
    model.config.architectures = ["LlamaForCausalLM"]
    res = surgery.apply(model, 'adapt modules("**.q_proj") with lora(r=4, rslora=true)\n'
                               'adapt modules("**.up_proj") with bone(block=16, variant=bat)\n'
                               f'save "{tmp_path / "saved"}"\n')
    train(res.model, ids)  # non-zero adapters, then save again through the same emitter
    from surgery.emit import save

    save(res.model, tmp_path / "saved", {"script": ""})
    with torch.no_grad():
        ref = res.model(input_ids=ids).logits
    loaded = surgery.load(tmp_path / "saved")
    loaded = getattr(loaded, "model", loaded) if not isinstance(loaded, nn.Module) else loaded
    assert type(loaded.model.layers[1].self_attn.q_proj).__name__ == "LoraLinear"
    assert type(loaded.model.layers[1].mlp.up_proj).__name__ == "BoneLinear"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
