"""Quantization through the compiler: .surg scripts, plan-time errors, save/load, ONNX export."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import LoadedModel, load_model
from surgery.passes.quantize.qlinear import QuantLinear

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("zoo:smollm2-135m").tokenizer


def tiny(tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary, so built-in corpora tokenize for it."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model=model, source="tiny", tokenizer=tokenizer, config=cfg.to_dict())


SCRIPT = """\
model base  = "zoo:smollm2-135m"
data  calib = corpus("pydoc", samples=8, seqlen=64)
quantize modules("model.layers.*.mlp.*_proj") to int4 using gptq(data=calib, group=32, act_order=true)
quantize modules("model.layers.*.self_attn.*_proj") to int8
export onnx "{out}/model.onnx"
save "{out}/model"
"""


def test_script_quantizes_saves_loads_and_exports(tmp_path, tokenizer):
    loaded = tiny(tokenizer)
    result = surgery.apply(loaded, SCRIPT.format(out=tmp_path))
    model = result.model
    qs = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qs) == 14
    assert {m.bits for n, m in qs.items() if ".mlp." in n} == {4}
    assert {m.bits for n, m in qs.items() if ".self_attn." in n} == {8}
    assert (tmp_path / "model.onnx").exists()
    back = surgery.load(tmp_path / "model")
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert isinstance(back.get_submodule("model.layers.1.mlp.down_proj"), QuantLinear)


def test_group_not_dividing_fails_at_plan_time():
    text = 'model base = "zoo:smollm2-135m"\n' \
           'quantize type(Linear) - modules("lm_head") to int4 using rtn(group=128)\n'
    with pytest.raises(SurgeryError) as e:
        surgery.compile(text).plan()
    msg = str(e.value)
    assert "group 128 does not divide in_features 576" in msg
    assert "model.layers.0.self_attn.q_proj" in msg and "64" in msg


def test_quantizing_twice_is_refused_naming_both_lines():
    text = 'model base = "zoo:smollm2-135m"\n' \
           'quantize modules("model.layers.0.mlp.up_proj") to int4\n' \
           'quantize modules("model.layers.0.mlp.*_proj") to int8\n'
    with pytest.raises(SurgeryError) as e:
        surgery.compile(text).plan()
    assert "already quantized" in str(e.value) and "line 2" in str(e.value)


def test_gptq_without_data_fails_at_check_time():
    text = 'model base = "zoo:smollm2-135m"\n' \
           'quantize modules("model.layers.0.mlp.up_proj") to int4 using gptq(group=64)\n'
    with pytest.raises(SurgeryError, match="data"):
        surgery.compile(text).check()


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("quantize_*.surg")))
def test_examples_check_and_plan(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith("#")
    surgery.compile(text).plan()
