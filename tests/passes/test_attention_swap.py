"""`swap softmax in SEL for stablemax|softplus` on the four model families of the issue:
HF LLaMA (eager and SDPA, GQA), HF BERT, nn.MultiheadAttention / TransformerEncoderLayer, and a plain
custom attention with F.softmax. After the swap: rows sum to 1, masked entries are exactly 0
(observed through the rewrite's weights hook), and outputs equal a direct reference within 1e-5."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from surgery.passapi import PassError
from surgery.passes.attention import AttentionSwap, attach_swaps, is_swapped
from surgery.registry import get_pass, module_type, surgery_modules
from test_attention_helpers import check_rows, collect_weights, ref_weights, swap

METHODS = [("stablemax", {}), ("softplus", {}), ("softplus", {"reweight": True, "p": 3.0})]
IDS = ["stablemax", "lssa", "lssar"]


def _kind(method, params):
    return "stablemax" if method == "stablemax" else "softplus"


def tiny_llama(impl="eager", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


ATTN = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


# -- LLaMA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_llama_attention_equals_reference(method, params):
    model = tiny_llama()
    swap(model, ATTN, method, **params)
    attn = model.model.layers[0].self_attn
    torch.manual_seed(1)
    x = torch.randn(2, 7, 64)
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = model.model.rotary_emb(x, pos)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    mask = torch.zeros(2, 1, 7, 7).masked_fill(~causal, torch.finfo(torch.float32).min)
    out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    # direct reference: projections, RoPE, GQA repeat, new normaliser, o_proj
    q = attn.q_proj(x).view(2, 7, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(2, 7, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(2, 7, 2, 16).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    w = ref_weights(_kind(method, params), q, k, causal, p=params.get("p", 15.0), reweight=params.get("reweight", False))
    ref = attn.o_proj((w @ v.double()).float().transpose(1, 2).reshape(2, 7, 64))
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_llama_eager_and_sdpa_agree_and_masks_are_exact(method, params):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0  # left padding in the second sequence
    outs = []
    for impl in ("eager", "sdpa"):
        model = tiny_llama(impl)
        report = swap(model, ATTN, method, **params)
        assert report.modules == 2 and report.per_module[ATTN[0]]["softmax_rewritten"] == 1
        seen, remove = collect_weights(model.model.layers[0].self_attn)
        outs.append(model(ids, attention_mask=am).logits)
        remove()

        def keep(w):
            k = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9).clone()
            k[1, :, :, :3] = False
            return k
        check_rows(seen, keep)
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1, 3:], outs[1][1, 3:], atol=1e-5)  # padded query rows are don't-care


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_llama_kv_cache_decoding_equals_full_forward(method, params):
    model = tiny_llama("sdpa")
    swap(model, ATTN, method, **params)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :6], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(6, 10):  # N_i is the absolute number of visible keys, cache included
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_swap_changes_output_and_gradients_flow():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    swap(model, ATTN, "softplus", reweight=True)
    model.train()
    out = model(ids, labels=ids)
    assert not torch.allclose(out.logits, before, atol=1e-3)
    out.loss.backward()
    g = model.model.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_reweight_at_train_false_reweights_only_in_eval():
    model = tiny_llama()
    lssa, lssar = copy.deepcopy(model), copy.deepcopy(model)
    swap(model, ATTN, "softplus", reweight=True, reweight_at_train=False)
    swap(lssa, ATTN, "softplus")
    swap(lssar, ATTN, "softplus", reweight=True)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    for m in (model, lssa, lssar):
        m.config.attention_dropout = 0.0
    model.train(), lssa.train()
    assert torch.allclose(model(ids).logits, lssa(ids).logits, atol=1e-6)
    model.eval(), lssar.eval()
    assert torch.allclose(model(ids).logits, lssar(ids).logits, atol=1e-6)


# -- BERT -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_bert_self_attention(method, params, impl):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, attn_implementation=impl)
    bert = BertModel(cfg).eval()
    paths = [n for n, m in bert.named_modules() if type(m).__name__ == "BertSelfAttention"]
    swap(bert, paths, method, **params)
    sa = bert.encoder.layer[0].attention.self
    seen, remove = collect_weights(sa)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    am = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    bert(ids, attention_mask=am)
    remove()
    keep = am.bool()[:, None, None, :]
    check_rows(seen, lambda w: keep.expand_as(w))
    # the first layer's attention output equals the reference on the same hidden states
    h = bert.embeddings(input_ids=ids)
    q = sa.query(h).view(2, 6, 4, 8).transpose(1, 2)
    k = sa.key(h).view(2, 6, 4, 8).transpose(1, 2)
    v = sa.value(h).view(2, 6, 4, 8).transpose(1, 2)
    w = ref_weights(_kind(method, params), q, k, keep, p=params.get("p", 15.0), reweight=params.get("reweight", False))
    ref = (w @ v.double()).float().transpose(1, 2).reshape(2, 6, 32)
    mask4 = torch.zeros(2, 1, 1, 6).masked_fill(~keep, torch.finfo(torch.float32).min)
    got = sa(h, attention_mask=mask4 if impl == "eager" else keep)[0]
    assert torch.allclose(got, ref, atol=1e-5)


# -- torch.nn.MultiheadAttention / TransformerEncoderLayer ---------------------------------------------

def _mha_ref(mha, x, keep, method, params):
    e, h = mha.embed_dim, mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    b, n = x.shape[0], x.shape[1]

    def heads(t):
        return t.view(b, n, h, e // h).transpose(1, 2)
    q, k, v = heads(F.linear(x, w_q, b_q)), heads(F.linear(x, w_k, b_k)), heads(F.linear(x, w_v, b_v))
    w = ref_weights(_kind(method, params), q, k, keep, p=params.get("p", 15.0), reweight=params.get("reweight", False))
    o = (w @ v.double()).float().transpose(1, 2).reshape(b, n, e)
    return mha.out_proj(o)


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_multihead_attention_need_weights_path(method, params):
    torch.manual_seed(0)
    root = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, batch_first=True)}).eval()
    swap(root, ["attn"], method, **params)
    mha = root["attn"]
    seen, remove = collect_weights(mha)
    x = torch.randn(2, 6, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(6)  # float, -inf above the diagonal
    out, _ = mha(x, x, x, attn_mask=causal)  # need_weights=True: bmm -> softmax -> bmm
    remove()
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    check_rows(seen, lambda w: keep.expand_as(w))
    assert torch.allclose(out, _mha_ref(mha, x, keep, method, params), atol=1e-5)


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_transformer_encoder_layer_sdpa_path(method, params):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    swap(layer, ["self_attn"], method, **params)
    seen, remove = collect_weights(layer.self_attn)
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.no_grad():  # inference: the fused fast path must stand down for the swap
        out = layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(6), src_key_padding_mask=pad)
    remove()
    keep = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & ~pad[:, None, None, :]
    check_rows(seen, lambda w: keep.expand_as(w))
    live = torch.tensor([[True] * 6, [True] * 6])
    h = x + _mha_ref(layer.self_attn, x, keep, method, params)
    h = layer.norm1(h)
    ref = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    assert torch.allclose(out[live], ref[live], atol=1e-5)


# -- plain custom attention ------------------------------------------------------------------------

class CustomAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = F.softmax(scores, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CustomAttention()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_custom_softmax_attention(method, params):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    paths = ["0.attn", "1.attn"]
    P = get_pass("swap", method)
    for path in paths:
        assert P(P.Params(**params)).check_module(path, model.get_submodule(path)) is None
    swap(model, paths, method, **params)
    attn = model[0].attn
    seen, remove = collect_weights(attn)
    x = torch.randn(2, 5, 32)
    out = attn(x)
    remove()
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    check_rows(seen, lambda w: keep.expand_as(w))
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = ref_weights(_kind(method, params), q, k, keep, p=params.get("p", 15.0), reweight=params.get("reweight", False))
    ref = attn.proj((w @ v.double()).float().transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.isfinite(model(x)).all()


# -- plan time (meta skeleton) and bad input -----------------------------------------------------------

def test_check_module_on_meta_skeleton():
    with torch.device("meta"):
        model = tiny_llama()
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    for method in ("stablemax", "softplus"):
        P = get_pass("swap", method)
        p = P(P.Params())
        assert p.check_module("model.layers.0.self_attn", model.model.layers[0].self_attn) is None
        assert p.check_module("model.layers.0", model.model.layers[0]) is None  # a decoder layer contains one
        assert p.check_module("model.layers.0.mlp", model.model.layers[0].mlp) == "no attention softmax found in LlamaMLP"
        assert p.check_module("model.norm", model.model.norm) == "no attention softmax found in LlamaRMSNorm"


class Router(nn.Module):
    """A softmax that is not attention (a gating softmax over a linear layer)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(32, 4)

    def forward(self, x):
        return F.softmax(self.gate(x), dim=-1)


def test_non_attention_softmax_is_reported():
    P = get_pass("swap", "stablemax")
    reason = P(P.Params()).check_module("router", Router())
    assert reason.startswith("no attention softmax found in Router: it calls softmax 1 time(s)")


def test_apply_on_module_without_attention_is_a_pass_error():
    model = tiny_llama()
    with pytest.raises(PassError, match="no attention softmax found in LlamaMLP") as e:
        swap(model, ["model.layers.0.mlp"], "stablemax")
    assert e.value.module == "model.layers.0.mlp" and e.value.hint
    assert not is_swapped(model.model.layers[0].mlp)


def test_swapping_twice_is_refused():
    model = tiny_llama()
    swap(model, ATTN[:1], "stablemax")
    P = get_pass("swap", "softplus")
    assert "already swapped" in P(P.Params()).check_module(ATTN[0], model.get_submodule(ATTN[0]))
    with pytest.raises(PassError, match="already swapped"):
        swap(model, ATTN[:1], "softplus")


@pytest.mark.parametrize("params,message", [
    ({"op": "gelu"}, "cannot swap 'gelu': supported ops are softmax"),
    ({"reweight": True, "p": 0.5}, "p must be between 1 and 64"),
    ({"reweight": True, "p": 100}, "p must be between 1 and 64"),
    ({"p": 3}, "p applies only with reweight=true"),
    ({"reweight_at_train": False}, "reweight_at_train applies only with reweight=true"),
    ({"reweight": True, "eps": 0}, "eps must be > 0"),
    ({"reweight": True, "offset_rows": -1}, "offset_rows must be >= 0"),
    ({"temperature": 2}, "Extra inputs are not permitted"),
])
def test_bad_parameters_are_validation_errors(params, message):
    with pytest.raises(ValidationError, match=message):
        get_pass("swap", "softplus").Params(**params)


def test_stablemax_rejects_unknown_op_and_softplus_keys():
    P = get_pass("swap", "stablemax")
    with pytest.raises(ValidationError, match="supported ops are softmax"):
        P.Params(op="relu")
    with pytest.raises(ValidationError):
        P.Params(p=3)


def test_registry_states_and_data_field():
    for method in ("stablemax", "softplus"):
        P = get_pass("swap", method)
        assert P.verb == "swap" and P.method == method
        assert "attention-swapped" in {s.value for s in P.produces}
        assert P.data_fields() == ["data"]


# -- save / load / copy --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_rebuild_from_manifest_records(method, params):
    model = tiny_llama()
    swap(model, ATTN, method, **params)
    records = surgery_modules(model)
    assert set(records) == {f"{p}.attention_swap" for p in ATTN}
    assert all(r["type"] == "AttentionSwap" for r in records.values())
    state = model.state_dict()
    assert not any("attention_swap" in k for k in state)  # weights keep their HF names
    # what surgery.load does: fresh base model, re-insert recorded modules, load weights, attach
    fresh = tiny_llama(seed=1)
    for path, rec in records.items():
        parent, _, name = path.rpartition(".")
        setattr(fresh.get_submodule(parent), name, module_type(rec["type"]).from_surgery_config(rec["config"]))
    fresh.load_state_dict(state)
    assert sorted(attach_swaps(fresh)) == ATTN
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_deepcopy_keeps_the_swap_on_the_copy():
    model = tiny_llama()
    swap(model, ATTN, "softplus", reweight=True)
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].self_attn.forward.__self__ is clone.model.layers[0].self_attn
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clone(ids).logits, model(ids).logits)
    assert isinstance(clone.model.layers[0].self_attn.attention_swap, AttentionSwap)


def test_transformer_encoder_stack_with_padding_in_inference():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    swap(enc, ["layers.0.self_attn", "layers.1.self_attn"], "softplus", reweight=True)
    seen, remove = collect_weights(enc.layers[1].self_attn)
    with torch.no_grad():  # eval + padding would otherwise use nested tensors and fused layers
        out = enc(x, src_key_padding_mask=pad)
    remove()
    check_rows(seen, lambda w: (~pad[:, None, None, :]).expand_as(w))
    assert out.shape == (2, 6, 32) and torch.isfinite(out).all()


class OddSignatureAttention(CustomAttention):
    """forward(x, temperature): no example value can be guessed for `temperature` at plan time."""

    def forward(self, x, temperature):
        return super().forward(x / temperature)


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.attn = OddSignatureAttention()

    def forward(self, ids):
        return self.attn(self.emb(ids), 1.0)


def test_untraceable_signature_is_traced_on_captured_inputs_at_run_time():
    torch.manual_seed(0)
    model = OddModel()
    P = get_pass("swap", "stablemax")
    assert P(P.Params()).check_module("attn", model.attn) is None  # deferred to run time
    report = swap(model, ["attn"], "stablemax")
    assert report.per_module["attn"]["softmax_rewritten"] == 1
    seen, remove = collect_weights(model.attn)
    model(torch.randint(0, 50, (2, 5)))
    remove()
    check_rows(seen, lambda w: torch.ones(5, 5, dtype=torch.bool).tril().expand_as(w))
