"""SparseLinear state: compact N:M storage round trips, rebuild from config, ONNX export."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from surgery.passapi import NM, Percent, RunContext
from surgery.passes.prune import SparseLinear, pack_nm, to_semi_structured, unpack_nm
from surgery.passes.prune.compact import index_bits
from surgery.passes.prune.masks import nm_keep
from surgery.progress import Progress
from surgery.registry import get_pass, module_type, surgery_modules


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 8), (2, 16), (5, 32), (7, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_is_exact(n, m, dtype):
    torch.manual_seed(0)
    W = torch.randn(6, 2 * m).to(dtype)
    keep = nm_keep(W.abs().float(), n, m)
    W = W.masked_fill(~keep, 0)
    W[0, keep[0].nonzero()[0]] = 0  # a kept slot holding 0 must stay a kept slot
    values, idx = pack_nm(W, keep, n, m)
    assert values.shape == (6, 2 * n) and values.dtype == dtype and idx.dtype == torch.uint8
    assert idx.shape[1] == -(-2 * n * index_bits(m) // 8)
    W2, keep2 = unpack_nm(values, idx, n, m, 2 * m)
    assert torch.equal(W2.view(torch.uint8) if dtype != torch.float32 else W2,
                       W.view(torch.uint8) if dtype != torch.float32 else W)
    assert torch.equal(keep2, keep)


def test_pack_refuses_a_mask_that_is_not_nm():
    keep = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="not exactly 2:4"):
        pack_nm(torch.randn(2, 8), keep, 2, 4)


def pruned_linear(n=2, m=4, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=bias).to(dtype)
    keep = nm_keep(lin.weight.detach().abs().float(), n, m)
    with torch.no_grad():
        lin.weight.masked_fill_(~keep, 0)
    return SparseLinear.from_linear(lin, keep, n=n, m=m)


def test_state_dict_is_compact_and_reloads_exactly(tmp_path):
    mod = pruned_linear()
    sd = mod.state_dict()
    assert set(sd) == {"weight_values", "weight_indices", "bias"}
    dense_bytes = mod.weight.numel() * 4 + mod.weight_mask.numel()
    compact_bytes = sum(t.numel() * t.element_size() for k, t in sd.items() if k != "bias")
    assert compact_bytes <= dense_bytes * 0.45  # 2:4 fp32: half the values + 2-bit indices
    save_file(sd, tmp_path / "w.safetensors")
    cls = module_type("SparseLinear")
    again = cls.from_surgery_config(mod.surgery_config())
    again.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    assert torch.equal(again.weight, mod.weight) and torch.equal(again.bias, mod.bias)
    assert torch.equal(again.weight_mask, mod.weight_mask)
    x = torch.randn(3, 64)
    assert torch.equal(again(x), mod(x))


def test_unstructured_state_dict_keeps_dense_weight_and_mask():
    lin = nn.Linear(16, 4)
    keep = torch.rand(4, 16) > 0.5
    mod = SparseLinear.from_linear(lin, keep, n=None, m=None)
    assert set(mod.state_dict()) == {"weight", "bias", "weight_mask"}
    again = SparseLinear.from_surgery_config(mod.surgery_config())
    again.load_state_dict(mod.state_dict())
    assert torch.equal(again.weight_mask, keep)


def test_whole_model_round_trip_through_registry(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    P = get_pass("prune", "magnitude")
    mods = {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers")}
    P(P.Params(sparsity=NM(n=2, m=4))).apply(
        RunContext(model=model, models={}, data={}, progress=Progress()), mods)
    saved = surgery_modules(model)
    assert len(saved) == 7 and all(v["type"] == "SparseLinear" for v in saved.values())
    sd = model.state_dict()
    assert "model.layers.0.mlp.up_proj.weight_values" in sd and not any(
        k.startswith("model.layers.0.mlp.up_proj.weight") and k.endswith("weight") for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    # what surgery.load does: base architecture, re-insert our modules, load the state dict
    torch.manual_seed(1)
    fresh = LlamaForCausalLM(cfg).eval()
    for path, entry in saved.items():
        parent, _, child = path.rpartition(".")
        setattr(fresh.get_submodule(parent), child,
                module_type(entry["type"]).from_surgery_config(entry["config"]))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    ids = torch.randint(0, 128, (1, 10))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="covered by the GPU test")
def test_semi_structured_conversion_is_skipped_without_a_gpu():
    mod = pruned_linear(dtype=torch.float16)
    model = nn.Sequential(mod)
    result = to_semi_structured(model)
    assert result == {"0": "not on a CUDA device"}
    assert not mod.weight.is_sparse
    assert to_semi_structured(nn.Sequential(pruned_linear(n=1, m=4))) == {"0": "not 2:4"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_on_gpu_matches_dense():
    mod = pruned_linear(dtype=torch.float16).cuda()
    x = torch.randn(64, 64, dtype=torch.float16, device="cuda")
    ref = mod(x)
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs compute capability >= 8.0")
    assert to_semi_structured(nn.Sequential(mod)) == {"0": "converted"}
    torch.testing.assert_close(mod(x), ref, rtol=1e-2, atol=1e-2)


def test_onnx_export_of_a_pruned_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    P = get_pass("prune", "magnitude")
    P(P.Params(sparsity=Percent(value=50))).apply(
        RunContext(model=model, models={}, data={}, progress=Progress()), {"0": model[0]})
    P(P.Params(sparsity=NM(n=2, m=4))).apply(
        RunContext(model=model, models={}, data={}, progress=Progress()), {"2": model[2]})
    x = torch.randn(5, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)
