"""Adapters on tiny models: exact identities, merge/unmerge, EVA ranks, Bone math, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.data import Dataset
from surgery.passapi import CallValue, PassError, RunContext, State
from surgery.passes.adapters import (BoneLinear, LoraLinear, adapter_layers, merge_adapters,
                                     trainable_parameters, unmerge)
from surgery.passes.adapters.eva import IncrementalPCA
from surgery.progress import Progress
from surgery.registry import get_pass

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int = 16, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def dataset(n: int = 16, seqlen: int = 32) -> Dataset:
    return Dataset("calib", tokens(n, seqlen), tokens(4, seqlen, seed=1))


def select(model: nn.Module, suffixes=TARGETS) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes}


def adapt(model, method: str, suffixes=TARGETS, data=None, seed: int = 0, **params):
    P = get_pass("adapt", method)
    p = P(P.Params(**params))
    ctx = RunContext(model=model, models={}, data={"calib": data} if data else {},
                     progress=Progress(), seed=seed)
    return p.run(ctx, select(model, suffixes)).report


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(model, ids, steps: int = 3, lr: float = 1e-2) -> None:
    """A few Adam steps so the adapters move away from their zero init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------------
# zero init is exact; trainable parameters

@pytest.mark.parametrize("method,params", [
    ("lora", {"r": 4, "alpha": 8}),
    ("lora", {"r": 4, "init": "gaussian", "rslora": True}),
    ("lora", {"r": 4, "init": CallValue(name="eva", kwargs={"data": "calib"})}),
    ("bone", {"block": 16}),
    ("bone", {"block": 32}),
    ("bone", {"block": 16, "variant": "bat"}),
])
def test_zero_init_leaves_outputs_unchanged(method, params):
    model, ids = tiny_llama(), tokens(2)
    ref = logits(model, ids)
    report = adapt(model, method, data=dataset(), **params)
    assert torch.equal(logits(model, ids), ref)
    layers = adapter_layers(model)
    assert len(layers) == report.metrics["adapters"] > 0
    # exactly the adapter parameters are trainable
    want = sum(p.numel() for m in layers.values() for p in m.adapter_parameters())
    assert trainable_parameters(model) == want == report.metrics["trainable_parameters"]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.rsplit(".", 2)[-2:][0] in ("lora_A", "lora_B") or n.endswith("bone_block")
                         for n in names)


def test_lora_defaults_and_scaling_match_peft_semantics():
    model = tiny_llama()
    adapt(model, "lora", suffixes=("q_proj",), r=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.scaling == 2.0
    assert torch.all(layer.lora_B.weight == 0)
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in) = U(+-1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound
    model2 = tiny_llama()
    adapt(model2, "lora", suffixes=("q_proj",), r=16, alpha=8, rslora=True, init="gaussian")
    layer2 = model2.model.layers[0].self_attn.q_proj
    assert layer2.scaling == 2.0  # alpha / sqrt(r)
    assert abs(layer2.lora_A.weight.std().item() - 1 / 16) < 0.01


def test_init_is_deterministic_per_seed():
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama()
    for m, seed in ((a, 0), (b, 0), (c, 1)):
        adapt(m, "lora", r=4, seed=seed)
    wa, wb, wc = (m.model.layers[1].mlp.up_proj.lora_A.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# ---------------------------------------------------------------------------------------------
# merge / unmerge

@pytest.mark.parametrize("method,params", [
    ("lora", {"r": 4, "alpha": 16}),
    ("bone", {"block": 16}),
    ("bone", {"block": 32}),
    ("bone", {"block": 16, "variant": "bat"}),
])
def test_merge_matches_unmerged_and_unmerge_round_trips(method, params):
    model, ids = tiny_llama(), tokens(4)
    originals = {n: p.detach().clone() for n, p in model.state_dict().items()}
    adapt(model, method, **params)
    train(model, ids, lr=1e-2 if method == "lora" else 1e-3)
    assert any(p.abs().sum() > 0 for m in adapter_layers(model).values()
               for p in m.adapter_parameters())
    unmerged = logits(model, ids)
    M = get_pass("merge", "adapters")
    layers = adapter_layers(model)
    report = M(M.Params()).run(RunContext(model=model, models={}, data={}, progress=Progress()),
                                 layers).report
    assert report.modules == len(layers) and not adapter_layers(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    merged = logits(model, ids)
    assert (merged - unmerged).abs().max() < 1e-5
    # the merged model is a plain checkpoint again (same keys as the original)
    assert set(model.state_dict()) == set(originals)
    assert unmerge(model) == list(layers)
    assert (logits(model, ids) - unmerged).abs().max() < 1e-5
    for n, p in model.state_dict().items():
        key = n.replace(".base_layer.", ".")
        if key in originals:
            assert torch.allclose(p, originals[key], atol=1e-6, rtol=0), n


def test_bone_merged_weight_formula():
    lin = nn.Linear(12, 6, bias=False)
    layer = BoneLinear(lin, 4)
    with torch.no_grad():
        layer.bone_block.copy_(torch.randn(4, 6))
    w, b = lin.weight.detach(), layer.bone_block.detach()
    merged = layer.merged_weight(w)
    for o in range(6):
        for col in range(12):
            assert torch.isclose(merged[o, col], w[o, col] + b[col % 4, o])
    x = torch.randn(3, 12)
    assert torch.allclose(layer(x), x @ merged.T, atol=1e-6)
    with pytest.raises(ValueError, match="bone block 5 must divide in_features 12"):
        BoneLinear(lin, 5)


def test_bat_formula_and_inverse():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=True)
    layer = BoneLinear(lin, 2, "bat")
    with torch.no_grad():
        layer.bone_block.copy_(0.1 * torch.randn(2, 2, 2))
    w, b = lin.weight.detach(), layer.bone_block.detach()
    merged = layer.merged_weight(w)
    for a in range(2):
        for c in range(4):
            blk = w[2 * a:2 * a + 2, 2 * c:2 * c + 2]
            assert torch.allclose(merged[2 * a:2 * a + 2, 2 * c:2 * c + 2],
                                  blk @ (torch.eye(2) + b[a]) + b[a], atol=1e-6)
    assert torch.allclose(layer.unmerged_weight(merged), w, atol=1e-6)
    x = torch.randn(5, 8)
    assert torch.allclose(layer(x), x @ merged.T + lin.bias, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# EVA

def eva(**kw):
    return CallValue(name="eva", kwargs={"data": "calib", **kw})


def test_eva_rho_one_gives_every_layer_r_and_orthonormal_rows():
    model = tiny_llama()
    report = adapt(model, "lora", data=dataset(), r=4, init=eva(rho=1))
    layers = adapter_layers(model)
    assert len(layers) == 14 and all(m.r == 4 and m.alpha == 8.0 for m in layers.values())
    assert report.metrics["rank_budget"] == 14 * 4
    for m in layers.values():
        a = m.lora_A.weight
        assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)
        assert torch.all(m.lora_B.weight == 0)


def test_eva_redistributes_within_budget_and_adjusts_alpha():
    model = tiny_llama()
    ids = tokens(2)
    ref = logits(model, ids)
    report = adapt(model, "lora", data=dataset(), r=4, alpha=8, init=eva(rho=2))
    ranks = {n: rep["r"] for n, rep in report.per_module.items()}
    assert sum(ranks.values()) == 14 * 4 == report.metrics["rank_budget"]
    assert max(ranks.values()) <= 8 and len(set(ranks.values())) > 1
    for n, m in adapter_layers(model).items():
        assert m.alpha == pytest.approx(8 * m.r / 4)
        assert m.scaling == pytest.approx(2.0)
        a = m.lora_A.weight
        assert torch.allclose(a @ a.T, torch.eye(m.r), atol=1e-5)
    # q/k/v share an input, so one SVD serves the three: 2 layers x (qkv, o, gate/up, down)
    assert report.metrics["eva_svds"] == 8
    assert torch.equal(logits(model, ids), ref)


def test_eva_components_are_the_principal_directions():
    """On one batch (a full SVD), the components equal torch.linalg.svd's right vectors."""
    torch.manual_seed(0)
    x = torch.randn(200, 12) @ torch.randn(12, 12)
    pca = IncrementalPCA(3)
    pca.partial_fit(x)
    _, s, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    assert torch.allclose(pca.singular_values, s[:3], rtol=1e-4)
    cos = (pca.components * vt[:3]).sum(1).abs()
    assert torch.allclose(cos, torch.ones(3), atol=1e-4)
    # keeping every component, incremental == batch: two halves give the SVD of the whole
    inc = IncrementalPCA(12)
    inc.partial_fit(x[:100])
    inc.partial_fit(x[100:])
    assert torch.allclose(inc.singular_values, s, rtol=1e-4)
    assert torch.allclose((inc.components[:3] * vt[:3]).sum(1).abs(), torch.ones(3), atol=1e-4)
    total = (x - x.mean(0)).square().sum()
    assert torch.allclose(inc.explained_variance_ratio.sum(), torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(inc.explained_variance_ratio[0], s[0] ** 2 / total, rtol=1e-4)
    assert torch.allclose(inc.mean, x.double().mean(0), atol=1e-9)
    assert torch.allclose(inc.var, x.double().var(0, unbiased=False), rtol=1e-9)


def test_eva_whiten_divides_by_sqrt_singular_values():
    a, b = tiny_llama(), tiny_llama()
    adapt(a, "lora", suffixes=("down_proj",), data=dataset(), r=4, init=eva(rho=1))
    adapt(b, "lora", suffixes=("down_proj",), data=dataset(), r=4, init=eva(rho=1, whiten=True))
    wa = a.model.layers[0].mlp.down_proj.lora_A.weight
    wb = b.model.layers[0].mlp.down_proj.lora_A.weight
    ratio = wa.norm(dim=1) / wb.norm(dim=1)  # = sqrt(singular value), decreasing
    assert torch.allclose(wb / wb.norm(dim=1, keepdim=True), wa, atol=1e-5)
    assert torch.all(ratio[:-1] >= ratio[1:])


# ---------------------------------------------------------------------------------------------
# adapters on quantized / pruned bases

class PackedLinear(nn.Module):
    """Stand-in for a quantized base: int8 weight buffer, no float weight parameter."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(lin.weight / scale).to(torch.int8))
        self.register_buffer("scale", scale.detach())

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).T


def test_lora_on_packed_base_trains_and_keeps_the_base_packed():
    model, ids = tiny_llama(), tokens(4)
    for path, lin in select(model, ("q_proj", "v_proj")).items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear(lin))
    P = get_pass("adapt", "lora")
    p = P(P.Params(r=4))
    assert p.check_module("x", PackedLinear(nn.Linear(8, 8))) is None
    mods = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    ref = logits(model, ids)
    p.run(RunContext(model=model, models={}, data={}, progress=Progress()), mods)
    assert torch.equal(logits(model, ids), ref)
    q = model.model.layers[0].self_attn.q_proj
    before = q.base_layer.qweight.clone()
    train(model, ids)
    assert torch.equal(q.base_layer.qweight, before) and q.base_layer.qweight.dtype == torch.int8
    assert q.lora_B.weight.abs().sum() > 0
    # bat needs the float weight; merging into packed weights is refused
    B = get_pass("adapt", "bone")
    bat = B(B.Params(block=4, variant="bat"))
    assert "quantized" in bat.check_module("x", PackedLinear(nn.Linear(8, 8)))
    assert State.QUANTIZED not in bat.accepts and State.QUANTIZED in bat.refusals
    assert State.QUANTIZED in B(B.Params(block=4)).accepts
    M = get_pass("merge", "adapters")
    assert "packed" in M(M.Params()).check_module("q", q)
    assert State.QUANTIZED in M.refusals and M.requires == {State.ADAPTED}
    with pytest.raises(PassError, match="packed"):
        merge_adapters(model)


def test_lora_on_pruned_base():
    model, ids = tiny_llama(), tokens(4)
    up = model.model.layers[0].mlp.up_proj
    with torch.no_grad():  # 2:4 magnitude mask along the input dim
        w = up.weight.view(up.out_features, -1, 4)
        keep = w.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
        w.mul_(mask)
    adapt(model, "lora", suffixes=("up_proj",), r=4)
    train(model, ids)
    base = model.model.layers[0].mlp.up_proj.base_layer.weight.view(up.out_features, -1, 4)
    assert torch.all((base != 0).sum(-1) <= 2)  # the frozen base keeps its sparsity


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_params_are_validation_errors():
    P = get_pass("adapt", "lora")
    with pytest.raises(ValidationError, match="r must be >= 1"):
        P.Params(r=0)
    with pytest.raises(ValidationError, match="eva needs calibration data"):
        P.Params(init=CallValue(name="eva", kwargs={"rho": 2}))
    with pytest.raises(ValidationError, match="eva needs calibration data"):
        P.Params(init="eva")
    with pytest.raises(ValidationError, match="unknown init"):
        P.Params(init="pissa")
    with pytest.raises(ValidationError, match="rho"):
        P.Params(init=CallValue(name="eva", kwargs={"data": "calib", "rho": 0.5}))
    with pytest.raises(ValidationError, match="extra"):
        P.Params(init=CallValue(name="eva", kwargs={"data": "calib", "bogus": 1}))
    with pytest.raises(ValidationError):
        P.Params(dropout=1.0)
    p = P(P.Params(init=CallValue(name="eva", kwargs={"data": "calib"})))
    assert p.params.init.data == "calib"
    B = get_pass("adapt", "bone")
    with pytest.raises(ValidationError):
        B.Params(block=0)
    with pytest.raises(ValidationError):
        B.Params(variant="mini")


def test_check_module_reasons():
    P, B = get_pass("adapt", "lora"), get_pass("adapt", "bone")
    lora = P(P.Params(r=4))
    assert "Embedding has no lora adapter" in lora.check_module("e", nn.Embedding(10, 4))
    assert "LayerNorm has no bone adapter" in B(B.Params(block=4)).check_module("n", nn.LayerNorm(4))
    with torch.device("meta"):  # bind runs on a weightless skeleton
        lin = nn.Linear(576, 1536)
    bat = B(B.Params(block=128, variant="bat"))
    reason = bat.check_module("model.layers.0.mlp.up_proj", lin)
    assert "bat block 128 does not divide in_features 576" in reason and "192" in reason
    assert B(B.Params(block=64, variant="bat")).check_module("x", lin) is None
    assert B(B.Params(block=1024)).check_module("x", lin).startswith(
        "bone block 1024 does not divide in_features 576")
    reason = B(B.Params(block=40)).check_module("x", lin)
    assert "bone block 40 does not divide in_features 576" in reason and "288, 576" in reason
    already = LoraLinear(nn.Linear(4, 4), 2, 2)
    assert "already has an adapter" in lora.check_module("x", already)
    assert lora.is_leaf(lin) and not lora.is_leaf(already) and not lora.is_leaf(nn.Embedding(3, 3))


def test_eva_without_declared_data_is_a_pass_error():
    model = tiny_llama()
    with pytest.raises(PassError, match="no data named `calib`"):
        adapt(model, "lora", r=4, init=eva())


def test_export_without_adapters_is_a_pass_error(tmp_path):
    E = get_pass("export", "peft")
    with pytest.raises(PassError, match="no adapters"):
        E(E.Params(path=str(tmp_path / "a"))).run(
            RunContext(model=tiny_llama(), models={}, data={}, progress=Progress()), {})
    assert not (tmp_path / "a").exists()


def test_surgery_config_rebuilds_the_wrappers():
    model = tiny_llama()
    adapt(model, "lora", suffixes=("q_proj",), r=4, alpha=16, rslora=True)
    adapt(model, "bone", suffixes=("up_proj",), block=16, variant="bat")
    for path, layer in adapter_layers(model).items():
        cfg = layer.surgery_config()
        new = type(layer).from_surgery_config(copy.deepcopy(cfg))
        new.load_state_dict(layer.state_dict())
        x = torch.randn(2, layer.in_features)
        assert torch.equal(new(x), layer(x)) and new.surgery_config() == cfg


@pytest.mark.parametrize("method,params", [("lora", {"r": 4}), ("bone", {"block": 16})])
def test_adapters_on_int4_quantlinear(method, params):
    """QLoRA-style on the quantize family's real QuantLinear: the base stays packed int4."""
    model, ids = tiny_llama(), tokens(4)
    Q = get_pass("quantize", "rtn")
    Q(Q.Params(format="int4", group=16)).run(
        RunContext(model=model, models={}, data={}, progress=Progress()), select(model))
    ref = logits(model, ids)
    ql = model.model.layers[0].self_attn.q_proj
    packed = {k: v.clone() for k, v in ql.state_dict().items()}
    P = get_pass("adapt", method)
    p = P(P.Params(**params))
    mods = {n: m for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    assert mods and all(p.is_leaf(m) and p.check_module(n, m) is None for n, m in mods.items())
    p.run(RunContext(model=model, models={}, data={}, progress=Progress()), mods)
    assert torch.equal(logits(model, ids), ref)
    train(model, ids, lr=1e-2 if method == "lora" else 1e-3)
    assert not torch.equal(logits(model, ids), ref)
    wrapper = model.model.layers[0].self_attn.q_proj
    assert wrapper.base_layer is ql
    assert all(torch.equal(v, packed[k]) for k, v in ql.state_dict().items())
    assert trainable_parameters(model) == sum(p.numel() for m in adapter_layers(model).values()
                                              for p in m.adapter_parameters())
    with pytest.raises(PassError, match="packed int4/int8"):
        merge_adapters(model)
    B = get_pass("adapt", "bone")
    assert "quantized" in B(B.Params(block=16, variant="bat")).check_module("q", ql)
