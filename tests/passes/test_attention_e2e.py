"""Swapped models through the whole product: `.surg` scripts via surgery.apply, save/load through the
manifest, ONNX export checked in ONNX Runtime (1e-4), and the real models (slow)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.diagnostics import SurgeryError
from surgery.passes.attention import is_swapped
from test_attention_helpers import swap


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _ort_logits(path, ids):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("stablemax", {}), ("softplus", {"reweight": True})],
                         ids=["stablemax", "lssar"])
def test_onnx_export_matches_pytorch(tmp_path, method, params):
    from surgery.backends.onnx.export import export_onnx

    model = tiny_llama()
    swap(model, ["model.layers.0.self_attn", "model.layers.1.self_attn"], method, **params)
    report = export_onnx(model, tmp_path / "m.onnx", tolerance=1e-4)
    assert report.verified and report.max_abs_diff <= 1e-4
    # standard ops only, and a sequence length other than the traced one still matches
    assert not any(op.startswith("surgery") for op in report.op_counts)
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(_ort_logits(tmp_path / "m.onnx", ids) - ref).max() <= 1e-4


def test_script_applies_swap_and_rejects_bad_input(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    result = surgery.apply(model, 'swap softmax in type(LlamaAttention) for softplus(reweight=true, p=3)\n')
    assert all(is_swapped(m) for n, m in result.model.named_modules() if n.endswith("self_attn"))
    assert not torch.allclose(result.model(ids).logits, before, atol=1e-3)
    bad = [
        ('swap softmax in modules("model.layers.*.mlp") for stablemax\n', "no attention softmax found in LlamaMLP"),
        ('swap gelu in type(LlamaAttention) for stablemax\n', "supported ops are softmax"),
        ('swap softmax in type(LlamaAttention) for softplus(reweight=true, p=0.5)\n', "p must be between 1 and 64"),
        ('swap softmax in type(LlamaAttention) for softplus(p=3)\n', "p applies only with reweight=true"),
        ('swap softmax in type(LlamaAttention) for sparsemax\n', "sparsemax"),
    ]
    for text, message in bad:
        with pytest.raises(SurgeryError) as e:
            surgery.apply(tiny_llama(), text)
        rendered = str(e.value)
        assert message in rendered, rendered
        assert ":1:" in rendered or "line 1" in rendered, rendered


def test_save_and_load_round_trip(tmp_path):
    model = tiny_llama()
    out = tmp_path / "swapped"
    result = surgery.apply(model, f'swap softmax in modules("model.layers.*.self_attn") for stablemax\nsave "{out}"\n')
    loaded = surgery.load(out)
    loaded_model = loaded if isinstance(loaded, torch.nn.Module) else loaded.model
    assert all(is_swapped(m) for n, m in loaded_model.named_modules() if n.endswith("self_attn"))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded_model(ids).logits, result.model(ids).logits)


# -- real models (slow) ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_swap_reports_perplexity_and_matches_reference():
    from surgery.data import corpus
    from surgery.models import load_model
    from surgery.passes.attention import functional as AF
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = load_model("zoo:smollm2-135m")
    model = lm.model.eval()
    ds = corpus(lm.tokenizer, "pydoc", samples=8, seqlen=128, seed=0)
    ds.evaluation = ds.evaluation[:8]
    paths = [n for n, m in model.named_modules() if n.endswith("self_attn")]
    from surgery.passapi import RunContext
    from surgery.progress import Progress
    from surgery.registry import get_pass

    P = get_pass("swap", "softplus")
    ctx = RunContext(model=model, models={}, data={"calib": ds}, progress=Progress())
    report = P(P.Params(data="calib")).run(ctx, {p: model.get_submodule(p) for p in paths}).report
    m = report.metrics
    assert report.modules == 30
    assert 1 < m["perplexity_before"] < 40  # SmolLM2 on pydoc text
    assert m["perplexity_after"] > m["perplexity_before"]  # a swap without fine-tuning costs quality
    # layer 0: the swapped module equals the reference LSSA on the same inputs (9/3 GQA heads)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 12, 576, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(x, torch.arange(12)[None])
    with torch.no_grad():
        out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
        q = attn.q_proj(x).view(1, 12, 9, 64).transpose(1, 2)
        k = attn.k_proj(x).view(1, 12, 3, 64).transpose(1, 2)
        v = attn.v_proj(x).view(1, 12, 3, 64).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = AF.softplus_attention(q.double(), k.double(), v.double(), is_causal=True)
        ref = attn.o_proj(o.float().transpose(1, 2).reshape(1, 12, 576))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.slow
def test_minilm_swap_masks_padding_exactly():
    from surgery.models import load_model
    from test_attention_helpers import check_rows, collect_weights

    lm = load_model("zoo:minilm-l6")
    bert = lm.model.eval()
    paths = [n for n, m in bert.named_modules() if type(m).__name__ == "BertSelfAttention"]
    swap(bert, paths, "stablemax")
    enc = lm.tokenizer(["a short one", "a noticeably longer sentence with more tokens in it"],
                       padding=True, return_tensors="pt")
    seen, remove = collect_weights(bert.encoder.layer[3].attention.self)
    with torch.no_grad():
        out = bert(**enc).last_hidden_state
    remove()
    keep = enc["attention_mask"].bool()[:, None, None, :]
    check_rows(seen, lambda w: keep.expand_as(w))
    assert torch.isfinite(out).all()
