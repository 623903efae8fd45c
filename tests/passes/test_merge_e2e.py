"""`merge` statements through the compiler: surgery.compile / check / plan / apply."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.diagnostics import SurgeryError


def tiny(seed, inter=64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=inter,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64)).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    for name, seed, inter in (("base", 0, 64), ("a", 1, 64), ("b", 2, 64), ("odd", 3, 48)):
        tiny(seed, inter).save_pretrained(d / name)
    return d


def script(d, body):
    return (f'model base = "hf:{d / "base"}"\nmodel a = "hf:{d / "a"}"\n'
            f'model b = "hf:{d / "b"}"\nmodel odd = "hf:{d / "odd"}"\n' + body)


@pytest.mark.parametrize("stmt", ["merge a, b into base using ties(density=0.5)",
                                  "merge a, b into base using widen()",
                                  "merge a, b using linear(weights=[1, 3])"])
def test_apply_merge_script(dirs, stmt):
    res = surgery.compile(script(dirs, stmt + "\n")).apply()
    k = "model.layers.0.mlp.up_proj.weight"
    a, b = tiny(1).state_dict()[k], tiny(2).state_dict()[k]
    got = res.model.state_dict()[k]
    if "linear" in stmt:
        torch.testing.assert_close(got, (a + 3 * b) / 4)
    else:
        assert not torch.equal(got, a) and torch.isfinite(got).all()


def test_missing_base_is_a_check_error(dirs):
    with pytest.raises(SurgeryError, match="needs a base model"):
        surgery.compile(script(dirs, "merge a, b using ties()\n")).check()


def test_width_out_of_range_is_a_check_error(dirs):
    with pytest.raises(SurgeryError, match=r"width must be in \[1, 2\]"):
        surgery.compile(script(dirs, 'data calib = corpus("pydoc", samples=4, seqlen=16)\n'
                                     "merge a, b using pleas(data=calib, width=2.5)\n")).check()


def test_pleas_without_data_is_a_check_error(dirs):
    with pytest.raises(SurgeryError, match="pleas needs data"):
        surgery.compile(script(dirs, "merge a, b using pleas()\n")).check()


def test_architecture_mismatch_is_a_plan_error(dirs):
    with pytest.raises(SurgeryError, match="up_proj.weight"):
        surgery.compile(script(dirs, "merge a, odd into base using task_arithmetic()\n")).plan()
