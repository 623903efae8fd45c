"""The attention swap in a streamed run (issue 19, docs/scale.md): its modules are traced on the
inputs the calibration forward gives them, block by block through the calibration engine, with
only the current block resident; the result is the in-memory run's, alone and before GPTQ; a
failure leaves no artifact; what cannot stream is refused at plan time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_executor import _apply, _bf16_checkpoint, _digest, _same, _script, _weights
from tests.test_multicalib import _no_step_threads, _reports


@pytest.fixture
def ckpt(tmp_path):
    return _bf16_checkpoint(tmp_path / "tiny-bf16")


SWAP = """
    model base = "hf:{ckpt}"
    swap softmax in type(LlamaAttention) for {method}
"""

SWAP_GPTQ = """
    model base = "hf:{ckpt}"
    data calib = corpus("pydoc", samples=4, seqlen=32)
    swap softmax in type(LlamaAttention) for stablemax()
    quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32, batch=2)
"""

GPTQ = """
    model base = "hf:{ckpt}"
    data calib = corpus("pydoc", samples=4, seqlen=32)
    quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32, batch=2)
"""


def _both(tmp_path: Path, script: Path) -> tuple[dict, dict]:
    assert _apply(script, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(script, tmp_path / "str", "--stream", "on") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    return mem, streamed


def _manifest(d: Path) -> dict:
    return json.loads((d / "surgery.json").read_text())


@pytest.mark.parametrize("method", ["stablemax()", "softplus(reweight=true, p=15)"])
def test_swap_alone_streams_like_memory_with_one_block_resident(ckpt, tmp_path, monkeypatch,
                                                                method):
    from surgery.passes.attention import common

    real_trace, real_engine = common.trace_stats, common.calibrate_sequential
    held = {}
    seen = []  # per trace on captured inputs: which blocks' q_proj weights are resident

    def engine(model, *a, **k):
        held["model"] = model
        return real_engine(model, *a, **k)

    def tracing(module, spec, args, kwargs):
        if "position_embeddings" in kwargs:  # captured from the model (not synthesised)
            layers = held["model"].model.layers
            seen.append([layers[i].self_attn.q_proj.weight.device.type != "meta"
                         for i in range(2)])
        return real_trace(module, spec, args, kwargs)

    monkeypatch.setattr(common, "calibrate_sequential", engine)
    monkeypatch.setattr(common, "trace_stats", tracing)
    s = _script(tmp_path, SWAP.format(ckpt=ckpt, method=method))
    _both(tmp_path, s)
    # in memory every block is resident; streamed, only the block being traced
    assert seen[:2] == [[True, True], [True, True]]
    assert seen[2:] == [[True, False], [False, True]]
    mem, streamed = _manifest(tmp_path / "mem"), _manifest(tmp_path / "str")
    assert mem["modules"] == streamed["modules"]
    assert sorted(p for p in streamed["modules"] if p.endswith("attention_swap")) == \
        ["model.layers.0.self_attn.attention_swap", "model.layers.1.self_attn.attention_swap"]
    # the same surgery-only layout record (why it is not a plain transformers directory)
    assert mem["weights"] == streamed["weights"]
    assert streamed["weights"]["layout"] == "surgery-only"
    assert set(streamed["weights"]["no_standard_form"]) == \
        {"model.layers.0.self_attn.attention_swap", "model.layers.1.self_attn.attention_swap"}
    rep_m, rep_s = _reports(tmp_path / "mem"), _reports(tmp_path / "str")
    assert rep_m[0] == rep_s[0]
    assert rep_s[0]["per_module"]["model.layers.1.self_attn"]["softmax_rewritten"] == 1
    # both load back swapped, to the same function
    import surgery
    from surgery.passes.attention.swap import is_swapped

    a, b = surgery.load(tmp_path / "mem"), surgery.load(tmp_path / "str")
    assert is_swapped(b.model.layers[1].self_attn)
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)
    # the swap without data needs no calibration data: nothing was declared
    assert "data" not in (tmp_path / "s.surg").read_text().split("swap")[0]


def test_swap_then_gptq_streams_like_memory(ckpt, tmp_path):
    s = _script(tmp_path, SWAP_GPTQ.format(ckpt=ckpt))
    _, streamed = _both(tmp_path, s)
    mem_m, str_m = _manifest(tmp_path / "mem"), _manifest(tmp_path / "str")
    assert mem_m["weights"] == str_m["weights"]
    assert mem_m["modules"] == str_m["modules"]
    rep_m, rep_s = _reports(tmp_path / "mem"), _reports(tmp_path / "str")
    assert rep_m[:2] == rep_s[:2]  # the same swap report and the same GPTQ losses per layer
    assert "model.layers.1.self_attn.q_proj.weight_packed" in streamed or \
        any(k.startswith("model.layers.1.self_attn.q_proj.") for k in streamed)
    # GPTQ calibrated block 1 on inputs computed through the swapped block 0: its losses
    # differ from those of GPTQ alone (a swap installed after the sweep would give the same)
    alone = tmp_path / "alone"
    alone.mkdir()
    g = _script(alone, GPTQ.format(ckpt=ckpt))
    assert _apply(g, alone / "str", "--stream", "on") == 0
    gptq_alone = _reports(alone / "str")[0]["per_module"]
    with_swap = rep_s[1]["per_module"]
    layer = "model.layers.1.self_attn.q_proj"
    assert gptq_alone[layer] != with_swap[layer]
    assert gptq_alone["model.layers.0.self_attn.q_proj"] == \
        with_swap["model.layers.0.self_attn.q_proj"]  # block 0's inputs come before any swap
    assert _no_step_threads()


def test_a_swap_failing_in_block_1_leaves_no_artifact(ckpt, tmp_path, capsys, monkeypatch):
    """Tracing fails on block 1's attention (block 0 is already swapped, quantized and written
    to the temporary directory in the streamed run): the in-memory run's diagnostic, no
    artifact, the input untouched, no step thread left."""
    from surgery.passes.attention import common

    real = common.trace_stats
    calls = {"n": 0}

    def failing(module, spec, args, kwargs):
        calls["n"] += "position_embeddings" in kwargs  # captured from the model, block by block
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(module, spec, args, kwargs)

    monkeypatch.setattr(common, "trace_stats", failing)
    before = _digest(ckpt)
    s = _script(tmp_path, SWAP_GPTQ.format(ckpt=ckpt))
    errs = {}
    for mode in ("off", "on"):
        calls["n"] = 0
        assert _apply(s, tmp_path / f"out-{mode}", "--stream", mode) == 2
        errs[mode] = capsys.readouterr().err
        assert not (tmp_path / f"out-{mode}").exists()
    assert ("error[E0801]: swap using stablemax failed (module `model.layers.1.self_attn`): "
            "tracing LlamaAttention failed: RuntimeError: injected") in errs["on"]
    assert errs["on"] == errs["off"]
    assert "5 | swap softmax" in errs["on"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _digest(ckpt) == before
    assert _no_step_threads()


def test_swap_measuring_perplexity_is_refused_at_plan_time(ckpt, tmp_path, capsys):
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=2, seqlen=16)
        swap softmax in type(LlamaAttention) for stablemax(data=calib)
    """)
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0902]: `swap using stablemax` cannot be streamed: data=calib measures " \
           "perplexity before and after the swap" in err
    assert "5 | swap softmax" in err
    assert not (tmp_path / "out").exists()
    # the script itself is valid: planning it (in memory) succeeds
    from surgery.cli import main

    assert main(["plan", str(s)]) == 0


def test_engine_inputs_mode_gives_each_target_its_first_call():
    """calibrate_sequential(inputs=True): the (args, kwargs) of each target's call, block by
    block, with block i's inputs computed through block i - 1 as the transform left it."""
    from transformers import LlamaForCausalLM

    from surgery.passes.calib import calibrate_sequential
    from surgery.progress import Progress
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    paths = [f"model.layers.{i}.self_attn" for i in range(2)]
    expected = {}
    def record(path):
        def pre(module, args, kwargs):
            expected.setdefault(path, kwargs["hidden_states"].clone())
        return pre

    handles = [model.get_submodule(p).register_forward_pre_hook(record(p), with_kwargs=True)
               for p in paths]
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    got, order = {}, []

    def transform(mods, captured):
        order.append(list(mods))
        for p in mods:
            got[p] = captured[p]

    calibrate_sequential(model, ids, {p: model.get_submodule(p) for p in paths}, transform,
                         progress=Progress(), batch_size=1, inputs=True)
    assert order == [[paths[0]], [paths[1]]]
    for p in paths:
        args, kwargs = got[p]
        assert torch.equal(kwargs["hidden_states"], expected[p])
        assert "position_embeddings" in kwargs


@pytest.mark.slow
def test_two_gloo_processes_stream_swap_then_gptq_like_one(ckpt, tmp_path):
    """The swap's trace runs its one sequence on every rank (nothing to split or reduce); GPTQ
    splits its batches: `--nproc 2` writes the same bytes and reports as one process."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    s = _script(tmp_path, SWAP_GPTQ.format(ckpt=ckpt))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SURGERY_TEST_FAIL_RANK", None)
    digests = {}
    for n in (1, 2):
        out = tmp_path / f"out-{n}"
        cmd = [sys.executable, "-m", "surgery", "apply", str(s), "-o", str(out),
               "--stream", "on"] + (["--nproc", "2"] if n == 2 else [])
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("calibrated with 2 processes (gloo)" in p.stdout) == (n == 2)
        digests[n] = ({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))},
                      _reports(out))
    assert digests[1][0] and digests[1] == digests[2]


def test_plan_estimate_counts_no_hessians_for_a_swap(ckpt, tmp_path, capsys):
    """The swap's trace collects nothing per layer: a streamed block costs its fp32 weights
    and the read of its largest tensor, with no Hessians and no calibration activations."""
    from transformers import LlamaForCausalLM

    from surgery.cli import main
    from tests.conftest import tiny_llama_config

    s = _script(tmp_path, SWAP.format(ckpt=ckpt, method="stablemax()"))
    assert main(["plan", str(s), "--format", "json"]) == 0
    parts = json.loads(capsys.readouterr().out)["memory"]["parts"]
    block = LlamaForCausalLM(tiny_llama_config()).model.layers[0]
    params = sum(p.numel() for p in block.parameters())
    biggest = max(p.numel() for p in block.parameters())
    assert parts["calibration_activations"] == 0
    assert parts["peak_unit"] == 4 * params + 2 * 2 * biggest  # bf16 checkpoint: 2 bytes


@pytest.mark.parametrize("body", [
    "swap softmax in type(LlamaAttention) for stablemax()",
    "swap softmax in type(LlamaAttention) for stablemax()\n"
    'quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32)',
], ids=["swap", "swap_then_gptq"])
def test_streamed_expectations_after_a_swap_equal_the_in_memory_ones(body, tmp_path, capsys):
    """`expect` evaluated block by block (executor/evaluate.py) on the swapped result: the same
    floats as in memory, and a real change from the original."""
    from tests.test_executor_expect import _both as both_expect
    from tests.test_executor_expect import _recipe

    ckpt = _bf16_checkpoint(tmp_path / "ck")
    mem, streamed = both_expect(tmp_path, _recipe(ckpt, body), capsys)
    assert streamed == mem
    assert mem[0]["value"] != mem[0]["original"]
