"""Several families in one script, through the whole pipeline: plan, apply, save, load."""

import pytest
import torch

import surgery


def test_prune_quantize_swap_adapt_round_trip(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    text = f'''model base = "hf:{tiny_hf_dir}"
data calib = corpus("pydoc", samples=8, seqlen=64, eval_windows=4)
let mlp = modules("model.layers.*.mlp.*_proj")
prune mlp to 2:4 using sparsegpt(data=calib)
quantize modules("model.layers.*.self_attn.*_proj") to int4 using gptq(group=32, data=calib)
swap softmax in modules("model.layers.*.self_attn") for softplus(reweight=true)
adapt modules("**.q_proj", "**.v_proj") with lora(r=4, alpha=8)
expect perplexity(calib) <= 2 * original
save "{out}"
'''
    prog = surgery.compile(text)
    plan = prog.plan()
    transforms = [r for r in plan.rows if not r.step.is_output]
    assert [len(r.modules) for r in transforms] == [6, 8, 2, 4]
    assert [r.step.verb for r in plan.rows if r.step.is_output] == ["save"]
    states = plan.to_json()["states"]
    assert states["model.layers.0.self_attn.q_proj"] == ["adapted", "quantized"]
    assert states["model.layers.0.mlp.up_proj"] == ["masked"]
    res = prog.apply()
    loaded = surgery.load(out)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(res.model(ids).logits, loaded(ids).logits)
    # 2:4 holds after everything else ran
    w = loaded.model.layers[0].mlp.up_proj
    assert type(w) is torch.nn.Linear  # 2:4 SparseGPT keeps a dense Linear with zeros
    groups = (w.weight.detach().reshape(w.weight.shape[0], -1, 4) != 0).sum(-1)
    assert int(groups.max()) <= 2


def test_merging_adapters_into_int4_names_both_lines(tiny_llama):
    text = ('let q = modules("**.q_proj")\nquantize q to int4 using rtn(group=32)\n'
            'adapt q with lora(r=4)\nmerge adapters in q\n')
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.compile(text).plan(tiny_llama)
    d = e.value.diagnostics[0]
    assert d.code == "E0500" and d.span.line == 4
    assert any(lb.span.line == 2 for lb in d.labels)
