"""The `train` statement on tiny models: determinism, resume after a kill, exact masks, CCE vs
full logits, distillation, and located errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import LoadedModel
from surgery.passes.adapters import adapter_layers
from surgery.passes.prune.masks import is_nm
from surgery.passes.prune.sparse_linear import SparseLinear
from surgery.passes.train import loop
from tests.conftest import tiny_llama_config, tiny_tokenizer

DATA = 'data calib = corpus("pydoc", samples=16, seqlen=32, eval_windows=2)\n'
ADAPT = 'adapt modules("**.q_proj", "**.v_proj") with lora(r=4)\n'
SMOL = 'model base = "zoo:smollm2-135m"\n' + DATA


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tiny(tokenizer, **config) -> LoadedModel:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    model.eval()
    return LoadedModel(model, "python:tiny", tokenizer=tokenizer)


def run(tokenizer, body: str, seed: int = 0, **config):
    return surgery.compile("surgery 1\n" + DATA + body).apply(tiny(tokenizer, **config), seed=seed)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {f"{path}.{i}": p.detach().clone() for path, layer in adapter_layers(model).items()
            for i, p in enumerate(layer.adapter_parameters())}


def train_step(result):
    return next(s for s in result.report.steps if s.verb == "train")


def plan_errors(body: str) -> list[dict]:
    """Diagnostics of `plan` on the SmolLM2 skeleton (config only: no weights are read)."""
    with pytest.raises(SurgeryError) as info:
        surgery.compile(SMOL + body).plan()
    return [d.to_json() for d in info.value.diagnostics]


# -- the language -------------------------------------------------------------------------------

def test_statement_reads_and_prints_back():
    text = "surgery 1\n" + SMOL + ADAPT + \
        "train adapters on calib for 200 steps using lm(lr=0.0005, batch=4, loss=cce)\n"
    prog = surgery.compile(text)
    step = prog.check().steps[-1]
    assert (step.verb, step.method, step.params.steps, step.params.data) == ("train", "lm", 200, "calib")
    assert "for 200 steps using lm(" in prog.to_text()
    one = surgery.compile("surgery 1\n" + SMOL + ADAPT + "train adapters on calib for 1 step using lm()\n")
    assert one.check().steps[-1].params.steps == 1


def test_fast_parser_and_lark_agree_on_step_counts():
    from surgery.parser import parse

    for text in ['train modules("**.q_proj") on calib for 12 steps using distill(temperature=2)\n',
                 "train adapters on calib for 1 step using lm()\n",
                 "train adapters on calib for 1.5 steps using lm()\n"]:
        try:
            fast = parse(text, fast=True).structure()
        except SurgeryError as e:
            fast = [d.to_json() for d in e.diagnostics]
        try:
            slow = parse(text, fast=False).structure()
        except SurgeryError as e:
            slow = [d.to_json() for d in e.diagnostics]
        assert fast == slow, text
    stmt = parse("train adapters on calib for 12 steps using lm()\n").statements[0]
    assert stmt.clauses[1].operands[0].value == 12


# -- bad input, located -------------------------------------------------------------------------

def test_training_a_quantized_layer_directly_is_refused_with_the_qlora_route():
    errs = plan_errors('quantize modules("**.q_proj") to int8\n'
                       'train modules("**.q_proj") on calib for 10 steps using lm()\n')
    assert len(errs) == 1 and errs[0]["code"] == "E0500"
    assert errs[0]["location"]["line"] == 4 and "quantized at line 3" in errs[0]["message"]
    assert "only through an adapter" in errs[0]["help"] and "train adapters" in errs[0]["help"]


def test_qlora_trains_through_the_adapter_of_a_quantized_layer():
    plan = surgery.compile(SMOL + 'quantize modules("**.q_proj") to int8\n' + ADAPT +
                           'train adapters on calib for 10 steps using lm()\n').plan()
    row = [r for r in plan.steps if r.step.verb == "train"][0]
    assert len(row.modules) == 60 and all(m.endswith(("q_proj", "v_proj")) for m in row.modules)


def test_nothing_to_train():
    errs = plan_errors("train adapters on calib for 10 steps using lm()\n")
    assert [e["code"] for e in errs] == ["E0340"]
    assert errs[0]["location"]["line"] == 3 and "adapt" in errs[0]["help"]


def test_zero_steps_is_an_invalid_value_at_the_count():
    errs = plan_errors(ADAPT + "train adapters on calib for 0 steps using lm()\n")
    assert errs[0]["code"] == "E0301" and errs[0]["location"]["line"] == 4
    assert errs[0]["location"]["column"] == 29  # the `0 steps`


def test_a_count_needs_its_unit():
    errs = plan_errors(ADAPT + "train adapters on calib for 10 using lm()\n")
    assert errs[0]["code"] == "E0211" and "step count" in errs[0]["message"]


def test_teacher_must_be_declared_or_original():
    errs = plan_errors(ADAPT + "train adapters on calib for 5 steps using distill(teacher=big)\n")
    assert [e["code"] for e in errs] == ["E0342"]
    assert errs[0]["location"]["line"] == 4 and "big" in errs[0]["message"]
    assert "original" in errs[0]["help"]


def test_data_smaller_than_one_batch():
    errs = plan_errors(ADAPT + "train adapters on calib for 5 steps using lm(batch=32)\n")
    assert [e["code"] for e in errs] == ["E0341"]
    assert "16 sample(s), fewer than one batch of 32" in errs[0]["message"]
    assert errs[0]["location"]["line"] == 4 and errs[0]["location"]["column"] == 19  # `calib`


def test_unknown_data_name():
    errs = plan_errors(ADAPT + "train adapters on nope for 5 steps using lm()\n")
    assert errs[0]["code"] == "E0200" and "nope" in errs[0]["message"]


# -- running ------------------------------------------------------------------------------------

TRAIN = "train adapters on calib for 6 steps using lm(lr=0.01, batch=4, log_every=1)\n"


def test_same_script_and_seed_give_byte_identical_adapters(tokenizer):
    a = adapter_state(run(tokenizer, ADAPT + TRAIN).model)
    b = adapter_state(run(tokenizer, ADAPT + TRAIN).model)
    assert a.keys() == b.keys() and len(a) == 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = adapter_state(run(tokenizer, ADAPT + TRAIN, seed=1).model)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_training_lowers_the_loss_and_trains_only_the_adapters(tokenizer):
    r = run(tokenizer, ADAPT + "train adapters on calib for 12 steps using lm(lr=0.01, batch=4)\n")
    m = train_step(r).report.metrics
    assert m["trained_parameters"] == 4 * 4 * (64 + 64) - 2 * 4 * (64 - 32)  # q 64->64, v 64->32
    assert m["loss_last"] < m["loss_first"] - 0.1
    base = tiny(tokenizer).model
    for name, p in r.model.named_parameters():
        if "lora_" not in name:
            ref = dict(base.named_parameters())[name.replace(".base_layer", "")]
            assert torch.equal(p, ref), name


def test_killed_run_resumes_to_the_same_weights(tokenizer, tmp_path, monkeypatch):
    body = ADAPT + ("train adapters on calib for 6 steps using lm(lr=0.01, batch=4, "
                    f'checkpoint_every=2, checkpoint="{tmp_path / "ckpt"}")\n')
    whole = adapter_state(run(tokenizer, body).model)
    assert not (tmp_path / "ckpt").exists()  # removed once training finished

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(loop, "after_step", kill)
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer, body)
    assert (tmp_path / "ckpt" / "state.pt").exists()
    monkeypatch.setattr(loop, "after_step", None)
    resumed = run(tokenizer, body)
    assert train_step(resumed).report.metrics["resumed_from"] == 2
    got = adapter_state(resumed.model)
    assert all(torch.equal(whole[k], got[k]) for k in whole)


def test_a_checkpoint_of_another_run_is_refused(tokenizer, tmp_path, monkeypatch):
    body = ADAPT + ("train adapters on calib for 4 steps using lm(batch=4, checkpoint_every=1, "
                    f'checkpoint="{tmp_path / "ckpt"}")\n')
    monkeypatch.setattr(loop, "after_step", lambda s: (_ for _ in ()).throw(KeyboardInterrupt)
                        if s == 2 else None)
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer, body)
    monkeypatch.setattr(loop, "after_step", None)
    with pytest.raises(SurgeryError) as info:
        run(tokenizer, body, seed=5)  # another seed: another run
    d = info.value.diagnostics[0]
    assert d.code.value == "E0343" and d.span.line == 4


def test_mdgf_sparse_training_keeps_exact_two_of_four_masks(tokenizer):
    body = ('prune modules("**.mlp.*_proj") to 2:4 using magnitude(training=mdgf(decay_coef=0.5, '
            'total_steps=6, fine_tune_steps=2))\n'
            'train modules("**.mlp.*_proj") on calib for 6 steps using lm(lr=0.01, batch=4)\n')
    before = tiny(tokenizer).model
    r = run(tokenizer, body)
    assert train_step(r).report.metrics["sparse_layers_finalised"] == 6
    layers = {n: m for n, m in r.model.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 6
    for name, mod in layers.items():
        assert mod.training_config is None and is_nm(mod.weight_mask, 2, 4)
        assert torch.equal(mod.weight != 0, mod.weight_mask)  # zero exactly where pruned
        assert not torch.equal(mod.weight, before.get_submodule(name).weight * mod.weight_mask)


def test_fixed_mask_training_keeps_pruned_weights_zero(tokenizer):
    r = run(tokenizer, 'prune modules("**.mlp.*_proj") to 2:4\n'
                       'train modules("**.mlp.*_proj") on calib for 4 steps using lm(lr=0.01, batch=4)\n')
    for mod in r.model.modules():
        if isinstance(mod, SparseLinear):
            assert is_nm(mod.weight_mask, 2, 4)
            assert not mod.weight[~mod.weight_mask].any()


def test_cce_and_full_logit_training_curves_agree(tokenizer):
    curves = {}
    for loss in ("cce", "full"):
        r = run(tokenizer, ADAPT + f"train adapters on calib for 8 steps using lm(lr=0.01, "
                                   f"batch=4, log_every=1, loss={loss})\n")
        curves[loss] = [e["loss"] for e in train_step(r).report.metrics["loss_log"]]
    assert len(curves["cce"]) == 8
    assert max(abs(a - b) for a, b in zip(curves["cce"], curves["full"])) < 1e-4
    assert curves["cce"][-1] < curves["cce"][0]


def test_distillation_from_the_original_pulls_towards_the_teacher(tokenizer):
    # Large initial weights make the random model's distributions peaked, so pruning half of
    # the MLP weights moves them visibly away from the teacher's.
    body = ('prune modules("**.mlp.*_proj") to 2:4\n'
            "train modules(\"**.mlp.*_proj\") on calib for 10 steps using distill(teacher=original, "
            "temperature=1, lr=0.003, batch=4, evaluate=true)\n")
    m = train_step(run(tokenizer, body, initializer_range=0.3)).report.metrics
    assert m["loss_last"] < 0.9 * m["loss_first"]
    assert m["perplexity_after"] < m["perplexity_before"]


def test_cce_loss_is_cross_entropy_on_full_logits():
    from surgery.training import cce_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (3, 7), generator=g)
    y[0, :3] = -100
    got = cce_loss(h, w, y)
    ref = F.cross_entropy((h @ w.T).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(got, ref, rtol=1e-5)
    gh, gw = torch.autograd.grad(got, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert torch.allclose(gh, rh, atol=1e-6) and torch.allclose(gw, rw, atol=1e-6)


def test_learning_rate_schedule_and_data_order():
    lrs = [loop.lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    order = loop.DataOrder(5, seed=0, key="k")
    first = order.indices(0, 10)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5))
    assert loop.DataOrder(5, seed=0, key="k").indices(3, 4) == first[3:7]


def test_qlora_run_trains_adapters_over_a_frozen_int8_base(tokenizer, tmp_path):
    from surgery.passes.quantize.qlinear import QuantLinear

    body = ('quantize modules("**.q_proj", "**.v_proj") to int8\n' + ADAPT +
            "train adapters on calib for 4 steps using lm(lr=0.01, batch=4)\n"
            f'export peft "{tmp_path / "peft"}"\n')
    untrained = run(tokenizer, body.replace("for 4 steps", "for 1 step").replace("lr=0.01", "lr=1e-9"))
    r = run(tokenizer, body)
    bases = {n: m for n, m in r.model.named_modules() if isinstance(m, QuantLinear)}
    ref = {n: m for n, m in untrained.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(bases) == 4
    for name, mod in bases.items():  # the packed base is untouched
        for key, t in mod.state_dict().items():
            assert torch.equal(t, ref[name].state_dict()[key]), (name, key)
    trained, before = adapter_state(r.model), adapter_state(untrained.model)
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_script_builder_writes_train_statements():
    from surgery.builder import Ref, Script

    s = (Script().version().model("base", "zoo:smollm2-135m")
         .data("calib", "pydoc", samples=16, seqlen=32)
         .adapt('modules("**.q_proj")', with_="lora")
         .train("adapters", on="calib", for_=200, using="distill", teacher=Ref("original"), lr=5e-4))
    text = s.to_text()
    assert "train adapters on calib for 200 steps using distill(teacher=original, lr=0.0005)" in text
    step = s.compile().check().steps[-1]
    assert (step.method, step.params.steps, step.params.teacher) == ("distill", 200, "original")


def test_distillation_from_a_declared_teacher_loads_it(tiny_hf_dir):
    text = (f'surgery 1\nmodel base = "hf:{tiny_hf_dir}"\nmodel teacher = "hf:{tiny_hf_dir}"\n'
            + DATA + 'prune modules("**.mlp.*_proj") to 2:4\n'
            'train modules("**.mlp.*_proj") on calib for 2 steps using distill(teacher=teacher, '
            'batch=4, hidden_mse=1)\n')
    r = surgery.compile(text).apply(seed=0)
    m = train_step(r).report.metrics
    assert m["steps"] == 2 and m["loss_first"] > 0  # the pruned student differs from its teacher


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_identical_saved_bytes(tiny_hf_dir, tmp_path):
    """A real `surgery apply` process killed with SIGKILL mid-training, rerun: the saved weights
    are byte-identical to those of a run that was never interrupted."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    def script(out):
        return (f'surgery 1\nmodel base = "hf:{tiny_hf_dir}"\n' + DATA + ADAPT +
                "train adapters on calib for 40 steps using lm(lr=0.01, batch=4, "
                f'checkpoint_every=2)\nsave "{out}"\n')

    def apply(path, **kw):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.Popen([sys.executable, "-m", "surgery.cli", "apply", str(path), "--quiet"],
                                env=env, cwd=tmp_path, **kw)

    def digest(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}

    (tmp_path / "a.surg").write_text(script(tmp_path / "a"))
    assert apply(tmp_path / "a.surg").wait(timeout=900) == 0
    (tmp_path / "b.surg").write_text(script(tmp_path / "a"))  # the same text: the same run
    ckpt = tmp_path / "a.train-line5.ckpt"
    proc = apply(tmp_path / "b.surg")
    reference = digest(tmp_path / "a")
    import shutil
    shutil.rmtree(tmp_path / "a")
    deadline = time.time() + 900
    while not (ckpt / "checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads((ckpt / "checkpoint.json").read_text())["step"]
    assert 2 <= step < 40
    assert apply(tmp_path / "b.surg").wait(timeout=900) == 0
    assert digest(tmp_path / "a") == reference and reference
    assert not ckpt.exists()
