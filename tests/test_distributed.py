"""Distributed calibration (surgery.distributed): 2 gloo processes give the same artifact as one
process, bit for bit, and a failing or dying rank makes the run fail with no artifact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery import distributed
from surgery.passes.calib.stats import LinearStats

ROOT = Path(__file__).parent.parent

SCRIPT = """surgery 1
model base = "hf:{model}"
data calib = corpus("pydoc", samples=10, seqlen=32)

prune modules("model.layers.*.mlp.*_proj") to 2:4 using sparsegpt(data=calib, batch_size=2)
quantize modules("model.layers.*.self_attn.*_proj") to int4 using gptq(data=calib, group=32, batch=2, true_sequential=true)
"""


# ---------------------------------------------------------------------------------------------
# Pieces, in one process


def test_batch_slices_are_contiguous_disjoint_and_cover_everything():
    for n in (2, 5, 7, 16):
        for world in (1, 2, 3, 4):
            if world > n:
                continue
            parts = [distributed.batch_slice(n, distributed.Group(r, world, "gloo"))
                     for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_assign_balances_cost_and_is_deterministic():
    costs = [10, 10, 10, 3, 3, 30, 30]  # q k v o ... with two wide layers
    owners = distributed.assign(costs, 2)
    assert owners == distributed.assign(list(costs), 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(load) == [46, 50]
    assert distributed.assign(costs, 1) == [0] * len(costs)


def test_deferred_statistics_equal_direct_accumulation_bitwise():
    torch.manual_seed(0)
    xs = [torch.randn(2, 16, 24) * (10 ** k) for k in range(-3, 4)]  # wide dynamic range
    direct, deferred = LinearStats(24), LinearStats(24)
    for x in xs:
        direct.add(x)
    deferred.defer()
    for x in xs:
        deferred.add(x)
    counts = deferred.local_counts()
    deferred.apply_pending()
    deferred.samples, deferred.tokens = counts
    for a, b in zip(direct.float_state(), deferred.float_state()):
        assert torch.equal(a, b)
    assert (direct.samples, direct.tokens) == (deferred.samples, deferred.tokens) == (14, 224)


def test_deferred_cross_statistics_equal_direct_accumulation_bitwise():
    """The cross sums X_refᵀX (EoRA's upstream target) fold like the Gram matrix."""
    torch.manual_seed(0)
    pairs = [(torch.randn(2, 16, 24) * (10 ** k), torch.randn(2, 16, 24)) for k in range(-2, 3)]
    direct, deferred = LinearStats(24, cross=True), LinearStats(24, cross=True)
    for x, ref in pairs:
        direct.add(x, paired=ref)
    deferred.defer()
    for x, ref in pairs:
        deferred.add(x, paired=ref)
    deferred.apply_pending()
    assert len(direct.float_state()) == 5
    for a, b in zip(direct.float_state(), deferred.float_state()):
        assert torch.equal(a, b)
    x = torch.cat([x.reshape(-1, 24) for x, _ in pairs]).double()
    ref = torch.cat([r.reshape(-1, 24) for _, r in pairs]).double()
    torch.testing.assert_close(direct.cross, ref.T @ x, rtol=1e-5, atol=1e-3)


def test_too_few_batches_for_the_ranks_is_a_located_pass_error(monkeypatch, tiny_llama):
    from surgery.passapi import PassError
    from surgery.passes.calib.engine import _Engine
    from surgery.progress import Progress

    monkeypatch.setattr(distributed, "_GROUP", distributed.Group(1, 2, "gloo"))
    with pytest.raises(PassError, match="1 calibration batch.*2 processes"):
        _Engine(tiny_llama, torch.zeros(4, 8, dtype=torch.long), {}, None, Progress(), 8,
                False, True, "x")


# ---------------------------------------------------------------------------------------------
# Real runs: 1 process in this one, 2 gloo processes under torchrun


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    d = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d / "model", safe_serialization=True)
    tiny_tokenizer().save_pretrained(d / "model")
    (d / "s.surg").write_text(SCRIPT.format(model=d / "model"))
    return d


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop(distributed.FAIL_ENV, None)
    env.update(extra)
    return env


def _digest(out: Path) -> dict:
    """Every weight file's bytes, and the run report without its timings."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "seconds"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.glob("*.safetensors"))}
    report = strip(json.loads((out / "surgery.json").read_text()))
    return {"files": files, "steps": report.get("steps", report)}


def _one_process(run_dir: Path, out: Path) -> None:
    from surgery.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1: same BLAS splits
    try:
        assert main(["apply", str(run_dir / "s.surg"), "-o", str(out), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)


def test_two_gloo_processes_give_the_same_artifact_as_one(run_dir):
    _one_process(run_dir, run_dir / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "surgery", "apply", str(run_dir / "s.surg"), "-o", str(run_dir / "two")]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "calibrated with 2 processes (gloo)" in p.stdout
    one, two = _digest(run_dir / "one"), _digest(run_dir / "two")
    assert one["files"] and one == two
    # both calibrated steps really ran, on both ranks' layers
    steps = json.loads((run_dir / "two" / "surgery.json").read_text())["steps"]
    per = [s["report"]["per_module"] for s in steps[:2]]
    assert [len(p) for p in per] == [6, 8]


@pytest.mark.slow
def test_a_streamed_run_splits_over_two_processes_bit_for_bit(run_dir):
    """The out-of-core executor (one calibrated step) under 2 ranks."""
    gptq = "\n".join(ln for ln in SCRIPT.format(model=run_dir / "model").splitlines()
                     if not ln.startswith("prune"))
    (run_dir / "g.surg").write_text(gptq + "\n")
    outs = {}
    for n in (1, 2):
        out = run_dir / f"streamed-{n}"
        cmd = [sys.executable, "-m", "surgery", "apply", str(run_dir / "g.surg"), "-o", str(out),
               "--quiet", "--stream", "on"] + (["--nproc", "2"] if n == 2 else [])
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[n] = _digest(out)
    assert outs[1]["files"] and outs[1] == outs[2]


@pytest.mark.parametrize("how", ["raise", pytest.param("exit", marks=pytest.mark.slow)])
def test_a_failing_rank_fails_every_rank_and_writes_nothing(run_dir, how):
    model = run_dir / "model" / "model.safetensors"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    out = run_dir / f"failed-{how}"
    spec = "1" if how == "raise" else "1:exit"
    cmd = [sys.executable, "-m", "surgery", "apply", str(run_dir / "s.surg"), "-o", str(out),
           "--quiet", "--nproc", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(**{distributed.FAIL_ENV: spec}),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "error[E0910]: rank 0 of 2:" in p.stderr  # rank 0 stopped with a diagnostic
    assert "the 2-process run failed" in p.stderr  # and the launcher says so last
    if how == "raise":
        assert "injected failure on rank 1" in p.stderr
    assert not out.exists()
    assert not [q for q in run_dir.iterdir() if q.name.startswith(f".{out.name}")]  # no temp
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
