"""Several calibrated steps in one streamed run (surgery/executor/multistep.py): the same bytes
and step reports as the in-memory run, and failures that stop every step's thread, surface the
original diagnostic and leave no artifact."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.test_executor import _apply, _bf16_checkpoint, _digest, _same, _script, _weights

ROOT = Path(__file__).parent.parent

SPARSE_GPTQ = """
    model base = "hf:{ckpt}"
    data calib = corpus("pydoc", samples=4, seqlen=32)
    prune type(Linear) - modules("lm_head") to 2:4 using sparsegpt(data=calib, batch_size=2)
    quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32, batch=2)
"""


@pytest.fixture
def ckpt(tmp_path):
    return _bf16_checkpoint(tmp_path / "tiny-bf16")


def _reports(d: Path) -> list[dict]:
    """Each step's report, less its timings."""
    steps = json.loads((d / "surgery.json").read_text())["steps"]
    out = []
    for s in steps:
        rep = dict(s["report"])
        rep["metrics"] = {k: v for k, v in rep.get("metrics", {}).items() if k != "seconds"}
        out.append({"line": s["line"], "per_module": rep["per_module"],
                    "metrics": rep["metrics"]})
    return out


def _both(tmp_path: Path, script: Path) -> tuple[dict, dict]:
    assert _apply(script, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(script, tmp_path / "str", "--stream", "on") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    return mem, streamed


def _no_step_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("surgery-calibrate")]


def test_sparsegpt_then_gptq_streams_bit_identically(ckpt, tmp_path):
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    _, streamed = _both(tmp_path, s)
    rep_m, rep_s = _reports(tmp_path / "mem"), _reports(tmp_path / "str")
    # the same masks and GPTQ losses, layer by layer, and the same step metrics
    assert rep_m[:2] == rep_s[:2]
    assert [r["line"] for r in rep_s[:2]] == [5, 6]
    assert len(rep_s[0]["per_module"]) == len(rep_s[1]["per_module"]) == 14
    assert rep_s[0]["metrics"]["sparsity"] == 0.5
    assert rep_s[1]["metrics"]["total_gptq_loss"] > 0
    # really sparse and quantized: packed int4 codes, and the mask kept zeros at 2 of every 4
    assert "model.layers.1.mlp.down_proj.weight_packed" in streamed
    import surgery

    q = surgery.load(tmp_path / "str").get_submodule("model.layers.1.mlp.down_proj")
    w = q.dequantized_weight()
    assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert _no_step_threads()


def test_one_calibrated_step_runs_in_the_calling_thread(ckpt, tmp_path, monkeypatch):
    """One calibrated step runs in the calling thread (no step thread), with the in-memory
    result; a streamed prune reports its sparsity from what it counted while each layer was
    resident (the blocks are back on meta when its pass returns)."""
    from surgery.executor.multistep import Sweep

    where = []
    real = Sweep._step

    def step(self, j, state):
        where.append(threading.current_thread() is threading.main_thread())
        return real(self, j, state)

    monkeypatch.setattr(Sweep, "_step", step)
    s = _script(tmp_path, """
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        prune type(Linear) - modules("lm_head") to 2:4 using sparsegpt(data=calib, batch_size=2)
    """.format(ckpt=ckpt))
    _both(tmp_path, s)
    assert _reports(tmp_path / "mem")[0] == _reports(tmp_path / "str")[0]
    assert _reports(tmp_path / "str")[0]["metrics"]["sparsity"] == 0.5
    assert where == [True]


def test_tensor_steps_between_and_after_calibrated_steps(tmp_path):
    """RTN on o_proj runs between SparseGPT (MLP) and GPTQ (q/k/v), so GPTQ's stream goes
    through the RTN'd o_proj of earlier blocks; RTN on lm_head (outside the blocks) and a
    magnitude prune after the last calibrated step run too, all in script order."""
    ckpt = _bf16_checkpoint(tmp_path / "untied", tied=False)
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        prune modules("model.layers.*.mlp.*_proj") to 2:4 using sparsegpt(data=calib, batch_size=2)
        quantize modules("model.layers.*.self_attn.o_proj") | modules("lm_head") to int8 using rtn()
        quantize modules("model.layers.*.self_attn.*_proj") - modules("model.layers.*.self_attn.o_proj") to int4 using gptq(data=calib, group=32, batch=2)
    """)
    _, streamed = _both(tmp_path, s)
    rep_m, rep_s = _reports(tmp_path / "mem"), _reports(tmp_path / "str")
    for a, b in zip(rep_m[:3], rep_s[:3]):
        assert a["per_module"] == b["per_module"]
    assert rep_m[2]["metrics"] == rep_s[2]["metrics"]  # GPTQ: same losses
    # int8 per channel (one scale a row, symmetric) on lm_head and o_proj, int4 g32 on q/k/v
    for name in ("lm_head", "model.layers.0.self_attn.o_proj"):
        assert streamed[f"{name}.weight_scale"].shape[1] == 1
        assert f"{name}.weight_zero_point" not in streamed
    assert streamed["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 2)


@pytest.mark.parametrize("first_only", ["prune", "quantize"])
def test_a_step_that_calibrates_only_the_first_block(ckpt, tmp_path, first_only):
    """One step's selector stops at block 0 (its engine stops advancing its stream there but
    still enters and leaves every block); the other step calibrates every block."""
    sel = {"prune": ('modules("model.layers.0.mlp.*")', 'type(Linear) - modules("lm_head")'),
           "quantize": ('type(Linear) - modules("lm_head")', 'modules("model.layers.0.*")')}
    p_sel, q_sel = sel[first_only]
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        prune {p_sel} to 2:4 using sparsegpt(data=calib, batch_size=2)
        quantize {q_sel} to int4 using gptq(data=calib, group=32, batch=2)
    """)
    _, streamed = _both(tmp_path, s)
    rep_m, rep_s = _reports(tmp_path / "mem"), _reports(tmp_path / "str")
    assert rep_m[:2] == rep_s[:2]
    counts = [len(r["per_module"]) for r in rep_s[:2]]
    assert counts == ([3, 14] if first_only == "prune" else [14, 7])
    if first_only == "quantize":  # block 1: pruned, not quantized, written in bf16
        assert streamed["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
        assert "model.layers.1.mlp.down_proj.weight_packed" not in streamed


def test_an_error_in_the_second_step_stops_everything(ckpt, tmp_path, capsys, monkeypatch):
    """GPTQ fails on block 1 (block 0 is already written to the temporary directory): the
    streamed run stops with the in-memory run's diagnostic, no artifact, no thread left."""
    from surgery.passes.calib.hessian import HessianError
    from surgery.passes.quantize import gptq

    real = gptq.gptq_quantize
    calls = {"n": 0}

    def failing(W, H, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # the second layer of block 1 (7 layers a block)
            raise HessianError("the damped Hessian is not positive definite; increase damp")
        return real(W, H, *a, **k)

    monkeypatch.setattr(gptq, "gptq_quantize", failing)
    before = _digest(ckpt)
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    errs = {}
    for mode in ("off", "on"):
        calls["n"] = 0
        assert _apply(s, tmp_path / f"out-{mode}", "--stream", mode) == 2
        errs[mode] = capsys.readouterr().err
        assert not (tmp_path / f"out-{mode}").exists()
    assert "error[E0801]: quantize using gptq failed (module `model.layers.1" in errs["on"]
    assert errs["on"] == errs["off"]  # the same diagnostic, located at the same line
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _digest(ckpt) == before
    assert _no_step_threads()


def test_an_error_in_the_first_step_stops_the_second(ckpt, tmp_path, capsys, monkeypatch):
    from surgery.passes.prune import sparsegpt

    real = sparsegpt.sparsegpt
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # block 1's first layer
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(sparsegpt, "sparsegpt", failing)
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    import surgery

    # a bug (not a PassError) surfaces as itself, from the main thread, as in memory
    with pytest.raises(RuntimeError, match="^injected$"):
        surgery.apply(None, s.read_text(), stream="on", output=tmp_path / "out")
    assert calls["n"] == 8
    assert not (tmp_path / "out").exists()
    assert _no_step_threads()


def test_interrupt_in_a_step_thread_leaves_no_artifact(ckpt, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt raised in the second step's thread (while it writes a block) is
    re-raised in the main thread: the interrupt exit code, no artifact, no thread left."""
    from surgery.executor.residency import Resident

    calls = {"n": 0}
    real = Resident.offload

    def interrupted(self, unit):
        calls["n"] += 1
        if calls["n"] == 3:  # embeddings and block 0 written already
            assert threading.current_thread().name == "surgery-calibrate-1"
            raise KeyboardInterrupt
        return real(self, unit)

    monkeypatch.setattr(Resident, "offload", interrupted)
    before = _digest(ckpt)
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    rc = _apply(s, tmp_path / "out", "--stream", "on")
    assert rc not in (0, 1, 2)
    assert "interrupted" in capsys.readouterr().err.lower()
    assert calls["n"] == 3
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _digest(ckpt) == before
    assert _no_step_threads()


def test_plan_estimate_counts_each_steps_block_inputs(ckpt, tmp_path, capsys):
    from surgery.cli import main

    one = _script(tmp_path, """
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32, batch=2)
    """.format(ckpt=ckpt), "one.surg")
    two = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt), "two.surg")
    est = {}
    for name, s in (("one", one), ("two", two)):
        assert main(["plan", str(s), "--format", "json"]) == 0
        est[name] = json.loads(capsys.readouterr().out)["memory"]["parts"]
    held = 4 * 32 * 64 * 4  # one step's block inputs: samples x seqlen x hidden, fp32
    assert est["two"]["calibration_activations"] - est["one"]["calibration_activations"] == held


@pytest.mark.slow
def test_two_gloo_processes_stream_two_calibrated_steps_like_one(ckpt, tmp_path):
    """`--nproc 2` on the streamed SparseGPT + GPTQ script gives the same bytes and reports."""
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SURGERY_TEST_FAIL_RANK", None)
    digests = {}
    for n in (1, 2):
        out = tmp_path / f"out-{n}"
        cmd = [sys.executable, "-m", "surgery", "apply", str(s), "-o", str(out),
               "--stream", "on"] + (["--nproc", "2"] if n == 2 else [])
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("calibrated with 2 processes (gloo)" in p.stdout) == (n == 2)
        digests[n] = ({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))},
                      _reports(out))
    assert digests[1][0] and digests[1] == digests[2]


def test_a_pass_that_calibrates_twice_is_stopped_with_a_located_error(ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    """A pass running the engine a second time (after its sweep) cannot share the pass: E0902
    at its line, not a second write of every block."""
    from surgery.passes.quantize import gptq

    real = gptq.calibrate_sequential

    def twice(*a, **k):
        real(*a, **k)
        real(*a, **k)

    monkeypatch.setattr(gptq, "calibrate_sequential", twice)
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0902]: `quantize using gptq` does not calibrate block by block" in err
    assert ":6:" in err
    assert not (tmp_path / "out").exists()
    assert _no_step_threads()


def test_sigint_while_the_main_thread_waits(ckpt, tmp_path, capsys, monkeypatch):
    """A real SIGINT (delivered to the main thread, which waits for the step threads): every
    step stops at its next hook, the interrupt exit code, no artifact, no thread left."""
    import os
    import signal

    from surgery.executor.residency import Resident

    calls = {"n": 0}
    real = Resident.offload

    def offload(self, unit):
        calls["n"] += 1
        if calls["n"] == 2:  # in step 1's thread, after block 0 is written
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, unit)

    monkeypatch.setattr(Resident, "offload", offload)
    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    rc = _apply(s, tmp_path / "out", "--stream", "on")
    assert rc == 128 + signal.SIGINT
    assert "interrupted by SIGINT" in capsys.readouterr().err
    assert calls["n"] == 2  # no unit was written after the interrupt
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _no_step_threads()
