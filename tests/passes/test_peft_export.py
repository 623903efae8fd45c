"""`export peft`: PEFT loads our adapters onto a fresh base and reproduces our logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from surgery.passapi import CallValue, PassError, RunContext
from surgery.passes.adapters import adapter_layers
from surgery.progress import Progress
from surgery.registry import get_pass

from tests.passes.test_adapters import adapt, dataset, tiny_llama, tokens, train

peft = pytest.importorskip("peft", reason="the PEFT round trip needs the peft package")

EVA = CallValue(name="eva", kwargs={"data": "calib", "rho": 2})


def export(model, path, sources=None) -> dict:
    E = get_pass("export", "peft")
    ctx = RunContext(model=model, models={}, data={}, progress=Progress(),
                     model_sources=sources or {})
    E(E.Params(path=str(path))).run(ctx, {})
    return json.loads((path / "adapter_config.json").read_text())


def peft_load(base: nn.Module, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


def out(model, ids) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


CASES = [
    ("lora-default", "lora", {"r": 4, "alpha": 8, "dropout": 0.1}),
    ("lora-gaussian-rslora", "lora", {"r": 4, "alpha": 8, "init": "gaussian", "rslora": True}),
    ("lora-eva", "lora", {"r": 4, "alpha": 8, "init": EVA}),
    ("bone", "bone", {"block": 16}),
    ("bat", "bone", {"block": 16, "variant": "bat"}),
]


@pytest.mark.parametrize("name,method,params", CASES, ids=[c[0] for c in CASES])
def test_peft_round_trip_tiny_llama(tmp_path, name, method, params):
    model, ids = tiny_llama(), tokens(4)
    adapt(model, method, data=dataset(), **params)
    train(model, ids, lr=1e-2 if method == "lora" else 1e-3)
    ours = out(model, ids)
    cfg = export(model, tmp_path / "ad", {"base": "zoo:tiny"})
    assert cfg["base_model_name_or_path"] == "zoo:tiny" and cfg["task_type"] == "CAUSAL_LM"
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    if method == "lora":
        assert cfg["peft_type"] == "LORA"
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
        assert len(tensors) == 2 * len(adapter_layers(model))
    else:
        assert cfg["peft_type"] == "MISS" and cfg["r"] == params["block"]
        assert "base_model.model.model.layers.1.mlp.down_proj.miss_block" in tensors
    if name == "lora-eva":  # EVA changed ranks: recorded per layer
        assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    loaded = peft_load(tiny_llama(), tmp_path / "ad")
    assert (out(loaded, ids) - ours).abs().max() < 1e-5
    assert (out(loaded, ids) - out(tiny_llama(), ids)).abs().max() > 1e-3  # adapters matter


def test_auto_peft_model_finds_the_base_by_itself(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from transformers import AutoTokenizer

    from tests.conftest import tiny_tokenizer

    model, ids = tiny_llama(), tokens(4)
    tiny_llama().save_pretrained(tmp_path / "base")
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(tmp_path / "base")
    adapt(model, "lora", r=4, alpha=8)
    train(model, ids, lr=1e-2)
    cfg = export(model, tmp_path / "ad", {"base": f"hf:{tmp_path / 'base'}"})
    assert cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad")).eval()
    assert (out(loaded, ids) - out(model, ids)).abs().max() < 1e-5
    assert (out(loaded, ids) - out(tiny_llama(), ids)).abs().max() > 1e-3  # adapters matter
    got = AutoTokenizer.from_pretrained(tmp_path / "ad")  # the base's tokenizer travels along
    assert got.chat_template == tok.chat_template and got("x y") == tok("x y")


def test_zoo_base_is_the_cached_directory():
    from surgery.models import local_dir, zoo_dir

    assert local_dir("zoo:minilm-l6") == zoo_dir("minilm-l6").resolve()
    assert (local_dir("zoo:minilm-l6") / "config.json").exists()
    assert local_dir("zoo:nope") is None and local_dir("hf:/no/such/dir") is None


def test_mixed_adapter_types_are_refused(tmp_path):
    model = tiny_llama()
    adapt(model, "lora", suffixes=("q_proj",), r=4)
    adapt(model, "bone", suffixes=("up_proj",), block=16)
    with pytest.raises(PassError, match="one adapter type"):
        export(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_replaces_an_existing_directory_atomically(tmp_path):
    model = tiny_llama()
    adapt(model, "lora", r=2)
    target = tmp_path / "ad"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    export(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]


def _minilm():
    from surgery.models import load_model

    try:
        return load_model("zoo:minilm-l6")
    except Exception as e:  # the zoo package is part of the test environment
        pytest.fail(f"zoo:minilm-l6 did not load: {e}")


@pytest.mark.parametrize("method,params", [
    ("lora", {"r": 8, "alpha": 16, "init": "gaussian"}),
    ("lora", {"r": 8, "alpha": 16, "init": EVA}),
    ("bone", {"block": 32}),
    ("bone", {"block": 32, "variant": "bat"}),
], ids=["lora-gaussian", "lora-eva", "bone", "bat"])
def test_peft_round_trip_minilm(tmp_path, method, params):
    lm = _minilm()
    model = lm.model
    ids = lm.tokenizer(["surgery on a sentence encoder", "a second, longer sentence here"],
                       padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    data = dataset()
    data.calibration = lm.tokenizer(["the quick brown fox jumps over the lazy dog"] * 8,
                                    return_tensors="pt")["input_ids"]
    adapt(model, method, suffixes=("query", "value"), data=data, **params)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):  # move B off zero: pull the embeddings toward a random target
        loss = (model(input_ids=ids).last_hidden_state - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ours = out(model, ids)
    cfg = export(model, tmp_path / "ad")
    assert cfg["task_type"] is None
    loaded = peft_load(_minilm().model, tmp_path / "ad")
    assert (out(loaded, ids) - ours).abs().max() < 1e-5
    assert (out(loaded, ids) - out(_minilm().model, ids)).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [
    ("lora", {"r": 8, "alpha": 16, "init": "gaussian"}),
    ("lora", {"r": 8, "alpha": 16, "init": EVA}),
    ("bone", {"block": 64}),
    ("bone", {"block": 64, "variant": "bat"}),
], ids=["lora-gaussian", "lora-eva", "bone", "bat"])
def test_peft_round_trip_smollm2(tmp_path, method, params):
    from surgery.data import corpus
    from surgery.models import load_model

    lm = load_model("zoo:smollm2-135m")
    model = lm.model
    ds = corpus(lm.tokenizer, "pydoc", samples=16, seqlen=64, seed=0)
    adapt(model, method, suffixes=("q_proj", "v_proj", "up_proj", "down_proj"), data=ds, **params)
    ids = ds.calibration[:2]
    train(model, ids, steps=2, lr=1e-3 if method == "lora" else 1e-4)
    ours = out(model, ids)
    export(model, tmp_path / "ad", {"base": "zoo:smollm2-135m"})
    loaded = peft_load(load_model("zoo:smollm2-135m").model, tmp_path / "ad")
    assert (out(loaded, ids) - ours).abs().max() < 1e-5
