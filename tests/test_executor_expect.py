"""`expect` in a streamed run (surgery/executor/evaluate.py): the metrics advance block by block
and report exactly what the in-memory run reports; a failing one leaves no artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.cli import main
from tests.test_executor import _apply, _bf16_checkpoint, _same, _script, _weights

EXPECTS = """expect perplexity(calib) <= 2 * original
expect max_abs_diff(calib) <= 100
expect cosine(calib) >= 0.5
"""

RECIPES = {
    # tensor-only path; the head stays as it is (shared by both streams)
    "rtn": 'quantize type(Linear) - modules("lm_head") to int8 using rtn()',
    # calibrated path: the blocks enter and leave through the calibration engine
    "gptq": 'quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, '
            'group=32)',
    # a quantized head tied to the embedding: the unit is touched before and after the blocks
    "tied_head": "quantize type(Linear) to int8 using rtn()",
    # GPTQ on the blocks, then RTN on the tied head: the head's unit is finished after the
    # calibration, and the original stream sees it through its twin
    "gptq_then_head": 'quantize type(Linear) - modules("lm_head") to int4 using '
                      'gptq(data=calib, group=32)\nquantize modules("lm_head") to int8',
    # two calibrated steps in one sweep (executor/multistep.py): the result stream starts after
    # the last step's capture and sees every block after both steps
    "sparsegpt_then_gptq": 'prune type(Linear) - modules("lm_head") to 2:4 using '
                           'sparsegpt(data=calib)\nquantize type(Linear) - modules("lm_head") '
                           'to int4 using gptq(data=calib, group=32)',
}


def _recipe(ckpt: Path, body: str, expects: str = EXPECTS, windows: int = 6) -> str:
    return (f'model base = "hf:{ckpt}"\n'
            f'data calib = corpus("pydoc", samples=4, seqlen=160, eval_windows={windows})\n'
            f"{body}\n{expects}")


def _expectations(out: Path) -> list[dict]:
    return json.loads((out / "surgery.json").read_text())["expectations"]


def _both(tmp_path: Path, text: str, capsys) -> tuple[list[dict], list[dict]]:
    """The expectations of an in-memory and a streamed run (surgery.json), checked against
    their `--format json` reports."""
    s = _script(tmp_path, text)
    out = []
    for mode, d in (("off", "mem"), ("on", "str")):
        capsys.readouterr()
        assert main(["apply", str(s), "-o", str(tmp_path / d), "--quiet", "--stream", mode,
                     "--format", "json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert ("streamed" in report) == (mode == "on")
        assert report["expectations"] == _expectations(tmp_path / d)
        out.append(report["expectations"])
    _same(_weights(tmp_path / "mem"), _weights(tmp_path / "str"))  # the gate changes nothing
    return out[0], out[1]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_streamed_expectations_equal_the_in_memory_ones(recipe, tmp_path, capsys):
    ckpt = _bf16_checkpoint(tmp_path / "ck")
    mem, streamed = _both(tmp_path, _recipe(ckpt, RECIPES[recipe]), capsys)
    assert [e["statement"] for e in mem] == [
        "expect perplexity(calib) <= 2 * original", "expect max_abs_diff(calib) <= 100",
        "expect cosine(calib) >= 0.5"]
    # the same windows, batches and reductions: the same floats, bit for bit
    assert streamed == mem
    ppl = mem[0]
    assert ppl["original"] > 1 and ppl["value"] != ppl["original"]  # a real change was measured
    assert 0 < mem[1]["value"] and mem[2]["value"] < 1


def test_streamed_merge_expectations_with_untied_embeddings(tmp_path, capsys):
    """Every unit is touched: the embeddings (the result's first-block inputs are captured
    again after the merge), the final norm and an untied head (twins for the original)."""
    a = _bf16_checkpoint(tmp_path / "a", seed=0, tied=False)
    b = _bf16_checkpoint(tmp_path / "b", seed=1, tied=False)
    text = (f'model a = "hf:{a}"\nmodel b = "hf:{b}"\n'
            'data calib = corpus("pydoc", samples=4, seqlen=160, eval_windows=5)\n'
            "merge a, b using linear(weights=[0.3, 0.7])\n"
            "expect perplexity(calib) <= 2 * original\nexpect cosine(calib) >= 0.05\n"
            "expect max_abs_diff(calib) <= 100\n")
    mem, streamed = _both(tmp_path, text, capsys)
    assert streamed == mem
    assert mem[0]["value"] != mem[0]["original"]


@pytest.mark.parametrize("recipe", ["rtn", "gptq"])
def test_failing_streamed_expectation_writes_nothing(recipe, tmp_path, capsys):
    ckpt = _bf16_checkpoint(tmp_path / "ck")
    s = _script(tmp_path, _recipe(ckpt, RECIPES[recipe],
                                  "expect perplexity(calib) <= 0.5 * original\n"
                                  "expect cosine(calib) >= 0.9\n"))
    capsys.readouterr()  # the checkpoint's writing
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 2
    err_mem = capsys.readouterr().err
    assert _apply(s, tmp_path / "str", "--stream", "on") == 2
    err_str = capsys.readouterr().err
    assert "error[E0800]: expectation failed: perplexity(calib)" in err_str
    assert "cosine" not in err_str  # the passing one is not reported as failed
    assert err_str == err_mem  # the same diagnostic, value and bound as in memory
    assert not (tmp_path / "mem").exists() and not (tmp_path / "str").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".str")] == []


def test_expect_on_a_model_without_repeated_blocks_is_e0903(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    d = tmp_path / "one-layer"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    s = _script(tmp_path, _recipe(d, RECIPES["rtn"]))
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0903]" in err and "no repeated blocks" in err and ":5:" in err
    assert not (tmp_path / "out").exists()


def test_plan_estimate_counts_the_evaluation_streams(tmp_path, capsys):
    ckpt = _bf16_checkpoint(tmp_path / "ck")
    s = _script(tmp_path, _recipe(ckpt, RECIPES["rtn"]))
    assert main(["plan", str(s), "--format", "json"]) == 0
    parts = json.loads(capsys.readouterr().out)["memory"]["parts"]
    # two streams x 6 windows x 160 tokens x hidden 64 x fp32
    assert parts["evaluation_hidden_states"] == 2 * 6 * 160 * 64 * 4
    s2 = _script(tmp_path, _recipe(ckpt, RECIPES["rtn"], expects=""), "plain.surg")
    assert main(["plan", str(s2), "--format", "json"]) == 0
    plain = json.loads(capsys.readouterr().out)["memory"]
    assert plain["parts"]["evaluation_hidden_states"] == 0


def _smollm2_bf16_copy(d: Path) -> Path:
    """zoo:smollm2-135m as an `hf:` directory in bf16, in two shards with an index."""
    from safetensors.torch import load_file, save_file

    from surgery.models import zoo_dir

    src = zoo_dir("smollm2-135m")
    d.mkdir()
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.mark.slow
def test_smollm2_streamed_perplexity_equals_in_memory(tmp_path, capsys):
    """SmolLM2-135M as a bf16 two-shard copy (30 blocks, tied head): RTN int8 on the blocks,
    perplexity gated streamed and in memory."""
    d = _smollm2_bf16_copy(tmp_path / "smol-bf16")
    text = (f'model base = "hf:{d}"\n'
            'data calib = corpus("pydoc", samples=4, seqlen=256, eval_windows=8)\n'
            'quantize type(Linear) - modules("lm_head") to int8 using rtn()\n'
            "expect perplexity(calib) <= 1.05 * original\n"
            "expect cosine(calib) >= 0.99\n")
    mem, streamed = _both(tmp_path, text, capsys)
    assert streamed[0]["original"] == mem[0]["original"]
    assert streamed[0]["value"] == mem[0]["value"]
    assert streamed == mem
    assert 1 < mem[0]["original"] < 100 and mem[0]["passed"]


def test_a_nan_difference_fails_the_streamed_gate(tmp_path, capsys, monkeypatch):
    """max_abs_diff is taken chunk by chunk: a NaN in any chunk must survive the running
    maximum (torch's max of a tensor holding NaN is NaN), so the gate fails as in memory."""
    from surgery import evaluate

    real, calls = evaluate.max_abs_diff, {"n": 0}

    def first_chunk_nan(a, b):
        calls["n"] += 1
        return float("nan") if calls["n"] == 1 else real(a, b)

    monkeypatch.setattr(evaluate, "max_abs_diff", first_chunk_nan)
    ckpt = _bf16_checkpoint(tmp_path / "ck")
    s = _script(tmp_path, _recipe(ckpt, RECIPES["rtn"], "expect max_abs_diff(calib) <= 100\n"))
    capsys.readouterr()
    assert _apply(s, tmp_path / "str", "--stream", "on") == 2
    assert "error[E0800]: expectation failed: max_abs_diff(calib) = nan" in capsys.readouterr().err
    assert calls["n"] > 1 and not (tmp_path / "str").exists()
