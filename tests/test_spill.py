"""Calibration activations spilled to disk (passes/calib/spill.py, docs/scale.md): the same
weights as in memory, bit for bit; the files are gone after success, failure and Ctrl-C; a
streamed run spills exactly when only that makes --max-memory fit; a full disk is E0912 with
no artifact."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from surgery.cli import main
from surgery.passes.calib import spill
from tests.test_executor import _apply, _bf16_checkpoint, _digest, _same, _script, _weights

GPTQ = """
    model base = "hf:{ckpt}"
    data calib = corpus("pydoc", samples=16, seqlen=32)
    quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32, batch=4)
"""


@pytest.fixture
def ckpt(tmp_path):
    return _bf16_checkpoint(tmp_path / "tiny-bf16")


def _leftovers(root) -> list[str]:
    return sorted(p.name for p in root.rglob("surgery-spill-*"))


class _Count:
    """Counts the hidden states written to spill files."""

    def __init__(self, monkeypatch):
        self.writes = 0
        real = spill._raw_write

        def counting(f, data):
            self.writes += 1
            return real(f, data)

        monkeypatch.setattr(spill, "_raw_write", counting)


def test_store_round_trip_is_bit_identical(tmp_path):
    from surgery.passes.calib.engine import _BlockInput

    store = spill.SpillStore(str(tmp_path / "root"))
    inputs = store.inputs()
    mask = torch.ones(1, 1, 5, 5)
    made = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = torch.randn(2, 5, 7).to(dtype)
        h[0, 0, 0] = float("nan")  # raw bytes: NaN payloads and signed zeros survive too
        h[0, 0, 1] = -0.0
        made.append(h)
        inputs.append(_BlockInput((h, 3), {"attention_mask": mask}))
    kw = torch.randn(3, 4)
    inputs.append(_BlockInput((), {"hidden_states": kw, "attention_mask": mask},
                              "hidden_states"))
    assert len(list(store.dir.iterdir())) == 4
    for i, h in enumerate(made):
        back = inputs[i]
        assert back.args[1] == 3 and back.kwargs["attention_mask"] is mask
        assert back.hidden().dtype == h.dtype and back.hidden().shape == h.shape
        assert torch.equal(back.hidden().view(torch.uint8) if h.dtype != torch.float32
                           else back.hidden().view(torch.int32),
                           h.view(torch.uint8) if h.dtype != torch.float32
                           else h.view(torch.int32))
    assert torch.equal(inputs[3].hidden(), kw) and inputs[3].args == ()
    inputs.drop()
    assert list(store.dir.iterdir()) == []
    store.close()
    assert _leftovers(tmp_path) == []


def test_spilled_streamed_gptq_is_byte_identical_and_leaves_no_files(ckpt, tmp_path,
                                                                    monkeypatch, capsys):
    s = _script(tmp_path, GPTQ.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(s, tmp_path / "str", "--stream", "on") == 0
    count = _Count(monkeypatch)
    root = tmp_path / "spill-here"
    assert _apply(s, tmp_path / "spilled", "--stream", "on", "--spill-activations",
                  str(root)) == 0
    # 4 batches captured, then written again as the inputs of the second block
    assert count.writes == 8
    assert _leftovers(tmp_path) == []
    spilled = _weights(tmp_path / "spilled")
    _same(_weights(tmp_path / "str"), spilled)
    _same(_weights(tmp_path / "mem"), spilled)
    for f in ("model.safetensors", "surgery.safetensors"):
        a, b = tmp_path / "str" / f, tmp_path / "spilled" / f
        if a.exists():
            assert a.read_bytes() == b.read_bytes()
    # the in-memory path spills too when asked, with the same result
    assert _apply(s, tmp_path / "mem-spilled", "--stream", "off", "--spill-activations",
                  str(root)) == 0
    assert count.writes == 16
    _same(_weights(tmp_path / "mem"), _weights(tmp_path / "mem-spilled"))
    assert _leftovers(tmp_path) == []


def test_budget_that_fits_only_with_spilling_spills(ckpt, tmp_path, monkeypatch, capsys):
    s = _script(tmp_path, GPTQ.format(ckpt=ckpt))
    assert main(["plan", str(s), "--format", "json"]) == 0
    est = json.loads(capsys.readouterr().out)["memory"]
    held, spilled = est["host_streamed_bytes"], est["host_streamed_spilled_bytes"]
    assert spilled < held
    count = _Count(monkeypatch)
    # between the two estimates: only the spilled run fits (--stream auto, the CLI default)
    assert main(["apply", str(s), "-o", str(tmp_path / "a"), "--format", "json",
                 "--max-memory", str((held + spilled) // 2)]) == 0
    rep = json.loads(capsys.readouterr().out)["streamed"]
    assert rep["spilled_activations_to"] == str(tmp_path.resolve())  # next to the output
    assert rep["estimate"]["host_streamed_bytes"] == spilled
    assert count.writes == 8 and _leftovers(tmp_path) == []
    # the budget that fits with the activations in memory does not spill
    assert main(["apply", str(s), "-o", str(tmp_path / "b"), "--format", "json",
                 "--stream", "on", "--max-memory", str(held)]) == 0
    rep = json.loads(capsys.readouterr().out)["streamed"]
    assert rep["spilled_activations_to"] is None
    assert rep["estimate"]["host_streamed_bytes"] == held
    assert count.writes == 8
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    # below even the spilled estimate: E0900 names the spilled need
    assert main(["apply", str(s), "-o", str(tmp_path / "c"), "--stream", "on",
                 "--max-memory", str(spilled - 1)]) == 2
    err = capsys.readouterr().err
    assert "error[E0900]" in err and not (tmp_path / "c").exists()
    # the plan says so in text too
    assert main(["plan", str(s)]) == 0
    assert "with calibration activations spilled to disk" in capsys.readouterr().out


def test_disk_full_while_spilling(ckpt, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = spill._raw_write

    def failing(f, data):
        calls["n"] += 1
        if calls["n"] == 6:  # the second block's inputs, half written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, data)

    monkeypatch.setattr(spill, "_raw_write", failing)
    before = _digest(ckpt)
    s = _script(tmp_path, GPTQ.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--stream", "on", "--spill-activations",
                  str(tmp_path / "sp")) == 2
    err = capsys.readouterr().err
    assert "error[E0912]" in err and "the disk filled up while spilling" in err
    assert "s.surg:5:1" in err  # located at the GPTQ statement
    assert calls["n"] == 6
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _leftovers(tmp_path) == []
    assert _digest(ckpt) == before


def test_interrupt_while_spilled_removes_the_files(ckpt, tmp_path, capsys, monkeypatch):
    seen = {"reads": 0, "files": 0}
    real = spill.SpilledInputs.__getitem__

    def interrupted(self, i):
        seen["reads"] += 1
        if seen["reads"] == 10:
            seen["files"] = len(list(self.store.dir.iterdir()))
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(spill.SpilledInputs, "__getitem__", interrupted)
    s = _script(tmp_path, GPTQ.format(ckpt=ckpt))
    rc = _apply(s, tmp_path / "out", "--stream", "on", "--spill-activations",
                str(tmp_path / "sp"))
    assert rc not in (0, 1, 2)
    assert "interrupted" in capsys.readouterr().err.lower()
    assert seen["files"] >= 4  # the files were there when the interrupt came
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "out").exists()


def test_two_calibrated_steps_spill_in_one_sweep(ckpt, tmp_path, monkeypatch):
    """Each step's thread (executor/multistep.py) spills its own stream, under the same root."""
    from tests.test_multicalib import SPARSE_GPTQ

    s = _script(tmp_path, SPARSE_GPTQ.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    dirs = set()
    real = spill.SpillStore.write

    def recording(self, t):
        path = real(self, t)
        dirs.add(path.parent.name)
        return path

    monkeypatch.setattr(spill.SpillStore, "write", recording)
    assert _apply(s, tmp_path / "spilled", "--stream", "on", "--spill-activations",
                  str(tmp_path / "sp")) == 0
    assert len(dirs) == 2  # one spill directory per calibrated step
    _same(_weights(tmp_path / "mem"), _weights(tmp_path / "spilled"))
    assert _leftovers(tmp_path) == []
