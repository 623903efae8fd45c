"""`prune` through the compiler: surgery.apply on a script, check-time errors, save and load."""

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import LoadedModel
from surgery.passes.prune import SparseLinear
from surgery.passes.prune.masks import is_nm


@pytest.fixture(scope="module")
def tokenizer():
    from surgery.models import load_model

    return load_model("zoo:smollm2-135m").tokenizer


def subject(tokenizer, hidden=64):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tokenizer), tie_word_embeddings=True)
    return LoadedModel(LlamaForCausalLM(cfg).eval(), "python:tiny", tokenizer=tokenizer,
                       config=cfg.to_dict())


SCRIPT = """\
model base  = "zoo:smollm2-135m"
data  calib = corpus("pydoc", samples=4, seqlen=64)
let mlp  = modules("model.layers.*.mlp.*_proj")
let attn = modules("model.layers.*.self_attn.*_proj")
prune mlp  to 2:4 using sparsegpt(data=calib, block=32)
prune attn to 60% using wanda(data=calib, refine=dsnot(skip_layer="none"))
"""


def test_apply_prunes_and_saves_compactly(tokenizer, tmp_path):
    lm = subject(tokenizer)
    out = tmp_path / "pruned"
    result = surgery.apply(lm, SCRIPT + f'save "{out}"\n')
    model = result.model
    mlp = [m for n, m in model.named_modules() if ".mlp." in n and isinstance(m, nn.Linear)]
    attn = [m for n, m in model.named_modules() if "self_attn." in n and isinstance(m, nn.Linear)]
    assert len(mlp) == 6 and len(attn) == 8
    assert all(isinstance(m, SparseLinear) and is_nm(m.weight_mask, 2, 4) for m in mlp)
    assert all(abs(m.sparsity() - 0.6) < 1e-3 for m in attn)
    assert not isinstance(model.lm_head, SparseLinear)
    from safetensors import safe_open

    # plain transformers reads model.safetensors: the dense weight, zeros where pruned; the
    # masks (surgery-only) are bit-packed beside it (surgery/deploy/sparse.py)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight_values" not in keys
    assert not any(k.endswith("weight_mask") for k in keys)
    up_mask = model.model.layers[0].mlp.up_proj.weight_mask
    assert torch.equal(up, model.model.layers[0].mlp.up_proj.weight.detach())
    assert not bool(up[~up_mask].any())
    with safe_open(str(out / "surgery.safetensors"), "pt") as f:
        bits = f.get_tensor("model.layers.0.mlp.up_proj.weight_mask_bits")
    assert bits.dtype == torch.uint8 and bits.numel() * 8 == up_mask.numel()
    again = surgery.load(out)
    ids = torch.randint(0, 1000, (1, 12))
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    for (n1, a), (n2, b) in zip(model.named_modules(), again.named_modules()):
        if isinstance(a, SparseLinear):
            assert type(b) is SparseLinear and torch.equal(a.weight_mask, b.weight_mask), n1


def _errors(text, lm):
    with pytest.raises(SurgeryError) as exc:
        surgery.compile(text).plan(lm.model)
    return exc.value.diagnostics


@pytest.mark.parametrize("target,reason", [
    ("5:4", "N must be at most M"),
    ("0:4", "N must be at least 1"),
    ("150%", "sparsity must be in [0, 100)"),
])
def test_bad_sparsity_fails_at_check_time_with_the_line(tokenizer, target, reason):
    lm = subject(tokenizer)
    text = ('model base = "zoo:smollm2-135m"\n'
            f'prune modules("model.layers.0.mlp.up_proj") to {target} using magnitude()\n')
    diags = _errors(text, lm)
    assert any(reason in d.message for d in diags), [d.message for d in diags]
    rendered = str(SurgeryError(diags))
    assert ":2:" in rendered and reason in rendered


def test_indivisible_in_features_fails_at_plan_time_naming_the_layer(tokenizer):
    lm = subject(tokenizer, hidden=72)  # 72 % 16 != 0
    text = ('model base = "zoo:smollm2-135m"\n'
            'prune modules("model.layers.0.self_attn.q_proj") to 2:16 using magnitude()\n')
    diags = _errors(text, lm)
    rendered = str(SurgeryError(diags))
    assert "model.layers.0.self_attn.q_proj" in rendered
    assert "M=16 does not divide in_features 72" in rendered and ":2:" in rendered


def test_prune_after_quantize_is_refused_naming_both_lines(tokenizer):
    from surgery.registry import get_pass

    assert get_pass("quantize", "rtn") is not None, "the quantize family ships with surgery"
    lm = subject(tokenizer)
    text = ('model base = "zoo:smollm2-135m"\n'
            'quantize modules("model.layers.0.mlp.up_proj") to int8 using rtn()\n'
            'prune modules("model.layers.0.mlp.up_proj") to 2:4 using magnitude()\n')
    rendered = str(SurgeryError(_errors(text, lm)))
    assert "line 2" in rendered and "cannot keep a sparsity mask" in rendered
