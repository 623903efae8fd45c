"""Structural skeletons (surgery/skeleton.py) must be indistinguishable from the real skeleton
for everything planning looks at, and planning must fall back to the real one when it has to."""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

import surgery
from surgery import skeleton
from surgery.models import build_skeleton, load_skeleton, zoo_config
from surgery.selectors import class_names


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(skeleton, "SHIPPED", tmp_path / "no-shipped")


def _summary(model: nn.Module) -> dict:
    mods = dict(model.named_modules(remove_duplicate=False))
    return {
        "modules": {n: class_names(m) for n, m in mods.items()},
        "attrs": {n: {k: getattr(m, k) for k in ("in_features", "out_features", "num_embeddings",
                                                 "embedding_dim", "padding_idx", "eps",
                                                 "normalized_shape", "head_dim", "layer_idx",
                                                 "training")
                      if hasattr(m, k)} for n, m in mods.items()},
        "params": [(n, tuple(p.shape), p.dtype, p.device.type, p.requires_grad)
                   for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()],
        "state_dict": list(model.state_dict()),
        "none_params": sorted(f"{n}.{k}" for n, m in mods.items()
                              for k, v in m._parameters.items() if v is None),
    }


def _tiny_llama_config() -> dict:
    from tests.conftest import tiny_llama_config

    cfg = tiny_llama_config().to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return cfg


@pytest.mark.parametrize("config", [_tiny_llama_config, lambda: zoo_config("minilm-l6")],
                         ids=["llama", "bert"])
def test_structural_skeleton_matches_the_real_one(config):
    cfg = config()
    real = build_skeleton(cfg)
    rebuilt = skeleton.build(json.loads(json.dumps(skeleton.describe(real))))
    assert skeleton.is_structural(rebuilt) and not skeleton.is_structural(real)
    assert _summary(rebuilt) == _summary(real)


def test_tied_weights_stay_tied():
    real = build_skeleton(_tiny_llama_config())
    assert real.lm_head.weight is real.model.embed_tokens.weight
    rebuilt = skeleton.build(skeleton.describe(real))
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight


def test_torch_leaves_are_real_torch_modules():
    rebuilt = skeleton.build(skeleton.describe(build_skeleton(_tiny_llama_config())))
    q = rebuilt.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q) is nn.Linear  # so pass checks and meta forwards behave as on the real one
    assert type(rebuilt.get_submodule("model.layers.0.self_attn")).__name__ == "LlamaAttention"


def test_first_load_describes_then_later_loads_use_the_description(tiny_hf_dir):
    first = load_skeleton(f"hf:{tiny_hf_dir}")
    assert not skeleton.is_structural(first.model)
    second = load_skeleton(f"hf:{tiny_hf_dir}")
    assert skeleton.is_structural(second.model)
    assert _summary(second.model) == _summary(first.model)
    assert not skeleton.is_structural(load_skeleton(f"hf:{tiny_hf_dir}", structural=False).model)


def test_corrupt_cache_falls_back_to_the_real_build(tiny_hf_dir):
    load_skeleton(f"hf:{tiny_hf_dir}")
    for f in skeleton.cache_dir().glob("*.json"):
        f.write_text("{not json")
    assert not skeleton.is_structural(load_skeleton(f"hf:{tiny_hf_dir}").model)


def test_plans_agree_and_code_checks_get_the_real_skeleton(tiny_hf_dir):
    src = (f'model base = "hf:{tiny_hf_dir}"\n'
           'data calib = corpus("pydoc", samples=4, seqlen=32)\n'
           'prune modules("model.layers.*.mlp.*_proj") to 2:4 using wanda(data=calib)\n'
           'quantize type(Linear) - modules("lm_head") to int4 using rtn(group=32)\n'
           'adapt modules("**.q_proj") with lora(r=4)\n')
    load_skeleton(f"hf:{tiny_hf_dir}")  # describe it
    structural = surgery.compile(src).plan()
    real = surgery.compile(src).plan(load_skeleton(f"hf:{tiny_hf_dir}", structural=False))
    assert structural.to_json()["steps"] == real.to_json()["steps"]

    # `swap` traces the attention forward at plan time: on a structural skeleton it could not,
    # so the plan builds the real one and still finds that an MLP has no attention softmax.
    bad = (f'model base = "hf:{tiny_hf_dir}"\n'
           'swap softmax in modules("model.layers.0.mlp") for stablemax\n')
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.compile(bad).plan()
    assert "softmax" in str(e.value)
