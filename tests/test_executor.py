"""The out-of-core executor (surgery/executor, docs/scale.md): a streamed run gives the weights
the in-memory run gives, bit for bit, writes bf16 where the checkpoint is bf16, and refuses or
fails cleanly (located error, no artifact, input untouched)."""

from __future__ import annotations

import errno
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch

from surgery.cli import main
from surgery.executor.writer import ShardWriter, read_sharded


def _bf16_checkpoint(d: Path, seed: int = 0, tied: bool = True) -> Path:
    """A tiny LLaMA in bf16, in two safetensors shards with an index, plus a tokenizer."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).to(torch.bfloat16)
    total = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(d, max_shard_size=int(total * 0.6))
    tiny_tokenizer().save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) == 2
    return d


@pytest.fixture
def ckpt(tmp_path):
    return _bf16_checkpoint(tmp_path / "tiny-bf16")


def _script(tmp_path: Path, body: str, name: str = "s.surg") -> Path:
    p = tmp_path / name
    p.write_text("surgery 1\n" + textwrap.dedent(body))
    return p


def _apply(script: Path, out: Path, *flags: str) -> int:
    return main(["apply", str(script), "-o", str(out), "--quiet", *flags])


def _weights(d: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((d / "surgery.json").read_text())
    stem = "surgery" if manifest["weights"]["layout"] == "surgery-only" else "model"
    return read_sharded(d, stem)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


RTN = """
    model base = "hf:{ckpt}"
    quantize type(Linear) - modules("lm_head") to int8 using rtn()
"""


def test_rtn_streamed_is_bit_identical_and_keeps_bf16(ckpt, tmp_path):
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(s, tmp_path / "str", "--stream", "on", "--max-shard-size", "60KB") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    # the streamed output is sharded with an index, as asked
    index = json.loads((tmp_path / "str" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert set(index["weight_map"]) == set(streamed)
    # untouched tensors come out in the checkpoint's dtype, with the checkpoint's values
    from safetensors.torch import load_file

    src = {}
    for f in ckpt.glob("*.safetensors"):
        src.update(load_file(str(f)))
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.1.input_layernorm.weight"):
        assert streamed[name].dtype == torch.bfloat16
        assert torch.equal(streamed[name], src[name])
    assert json.loads((tmp_path / "str" / "config.json").read_text())["dtype"] == "bfloat16"
    # both load back in surgery, to the same model
    import surgery

    a, b = surgery.load(tmp_path / "mem"), surgery.load(tmp_path / "str")
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_dtype_flag_overrides_the_output_dtype(ckpt, tmp_path):
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--stream", "on", "--dtype", "fp32") == 0
    w = _weights(tmp_path / "out")
    assert w["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.parametrize("row_blocks", [False, True])
def test_linear_merge_streamed_is_bit_identical(tmp_path, monkeypatch, row_blocks):
    if row_blocks:  # every 2-D tensor merged a few rows at a time, read in slices
        from surgery.executor import run as run_mod

        monkeypatch.setattr(run_mod, "MERGE_BLOCK_BYTES", 4 * 64 * 3)
    from surgery.executor.checkpoint import Checkpoint

    slices = []
    real = Checkpoint.read_rows
    monkeypatch.setattr(Checkpoint, "read_rows",
                        lambda self, *a: (slices.append(a), real(self, *a))[1])
    a = _bf16_checkpoint(tmp_path / "a", seed=0, tied=False)
    b = _bf16_checkpoint(tmp_path / "b", seed=1, tied=False)
    s = _script(tmp_path, f"""
        model a = "hf:{a}"
        model b = "hf:{b}"
        merge a, b using linear(weights=[0.3, 0.7])
    """)
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(s, tmp_path / "str", "--stream", "on") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    # really a merge: neither input
    from safetensors.torch import load_file

    src = {}
    for f in a.glob("*.safetensors"):
        src.update(load_file(str(f)))
    assert not torch.equal(streamed["lm_head.weight"], src["lm_head.weight"])
    assert streamed["lm_head.weight"].dtype == torch.bfloat16
    assert bool(slices) == row_blocks


def test_gptq_streamed_gives_identical_codes(ckpt, tmp_path):
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, group=32)
    """)
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(s, tmp_path / "str", "--stream", "on") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    assert any(k.endswith("weight_packed") for k in streamed)
    rep_m = json.loads((tmp_path / "mem" / "surgery.json").read_text())["steps"][0]["report"]
    rep_s = json.loads((tmp_path / "str" / "surgery.json").read_text())["steps"][0]["report"]
    assert rep_m["per_module"] == rep_s["per_module"]  # same GPTQ losses, layer by layer


def test_a_calibrated_block_leaves_no_weights_behind(ckpt, tmp_path, monkeypatch):
    # A replaced Linear is still held by the pass's target dict; offloading its block must free
    # the weights it was onloaded with, or every GPTQ block leaks one block of fp32 weights.
    import gc

    from surgery.executor import residency

    def weights_alive():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                   and not o.is_meta and o.dtype == torch.float32 and o.dim() == 2
                   and o.shape[0] * o.shape[1] >= 64 * 64)

    alive = []
    real = residency.Resident.offload

    def offload(self, unit):
        real(self, unit)
        alive.append(weights_alive())

    monkeypatch.setattr(residency.Resident, "offload", offload)
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=2, seqlen=16)
        quantize modules("model.layers.*.*.*_proj") to int4 using gptq(data=calib, group=32)
    """)
    before = weights_alive()  # other tests' leftovers, in a full run
    assert _apply(s, tmp_path / "out", "--stream", "on") == 0
    assert len(alive) >= 3 and alive == [before] * len(alive)


def test_budget_below_one_block_is_a_plan_time_error(ckpt, tmp_path, capsys):
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--stream", "on", "--max-memory", "1MB") == 2
    err = capsys.readouterr().err
    assert "error[E0900]" in err and "raise --max-memory to at least" in err
    assert not (tmp_path / "out").exists()


def test_truncated_shard_found_mid_run(ckpt, tmp_path, capsys):
    shards = sorted(ckpt.glob("*.safetensors"))
    victim = shards[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _digest(ckpt)
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0603]" in err and f"shard `{victim.name}` is truncated" in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _digest(ckpt) == before


def test_disk_full_while_writing_shards(ckpt, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = ShardWriter._raw_write

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] == 5:  # a few tensors in: a shard is half written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(ShardWriter, "_raw_write", failing)
    before = _digest(ckpt)
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0805]" in err and "the disk filled up while writing" in err
    assert calls["n"] == 5
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _digest(ckpt) == before


def test_cuda_without_a_gpu_is_a_plan_time_error(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "out", "--device", "cuda") == 2
    assert "error[E0901]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_what_cannot_stream_is_refused_at_plan_time(ckpt, tmp_path, capsys):
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        quantize type(Linear) to int4 using gptq(data=calib, group=32)
    """)
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0902]" in err and "`lm_head`" in err and ":5:" in err
    assert not (tmp_path / "out").exists()
    # `expect` streams (tests/test_executor_expect.py); E0903 is for a model without blocks


def test_compensate_is_refused_in_a_streamed_run_at_plan_time(ckpt, tmp_path, capsys):
    # It reads W from a second whole model in memory, so streaming would not bound memory. It
    # used to fail mid-run (the sweep's stale targets, then no source to reload).
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        let body = modules("model.layers.*.*.*_proj")
        quantize body to int4 using gptq(data=calib, group=32)
        compensate body using eora(rank=4, data=calib, upstream=0.5)
    """)
    assert _apply(s, tmp_path / "out", "--stream", "on") == 2
    err = capsys.readouterr().err
    assert "error[E0902]" in err and "compensate using eora" in err and ":7:" in err
    assert not (tmp_path / "out").exists()
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0


def test_plan_prints_the_memory_estimate(ckpt, tmp_path, capsys):
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert main(["plan", str(s)]) == 0
    out = capsys.readouterr().out
    assert "estimated peak host memory" in out and "streamed" in out
    assert main(["plan", str(s), "--format", "json"]) == 0
    est = json.loads(capsys.readouterr().out)["memory"]
    # the largest unit of the tiny model is a block: q,o 64x64; k,v 64x32; 3 MLP 64x128; 2 norms
    assert est["largest_unit_bytes"] == (2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64) * 4
    assert est["host_in_memory_bytes"] > est["host_streamed_bytes"]


def test_in_memory_bf16_checkpoint_is_not_upcast(ckpt, tmp_path):
    """The in-memory path too: loaded in fp32 for compute, written back in bf16."""
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    w = _weights(tmp_path / "mem")
    floats = {k: v.dtype for k, v in w.items() if v.is_floating_point()
              and not k.endswith("weight_scale")}
    assert set(floats.values()) == {torch.bfloat16}


@pytest.mark.slow
def test_smollm2_bf16_copy_streams_bit_identically(tmp_path):
    """SmolLM2 (tied embeddings, 30 blocks) as a bf16 copy: streamed RTN int8 == in memory, and
    every tensor no step touched comes out bf16 with the input's values."""
    from safetensors.torch import load_file, save_file

    from surgery.models import zoo_dir

    src = zoo_dir("smollm2-135m")
    d = tmp_path / "smol-bf16"
    d.mkdir()
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    s = _script(tmp_path, RTN.format(ckpt=d))
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(s, tmp_path / "str", "--stream", "on") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    for name, t in state.items():
        if name in streamed:  # untouched: embeddings, norms
            assert streamed[name].dtype == torch.bfloat16 and torch.equal(streamed[name], t)
    assert "model.embed_tokens.weight" in streamed


def test_interrupt_mid_run_leaves_no_artifact(ckpt, tmp_path, capsys, monkeypatch):
    from surgery.executor.residency import Resident

    calls = {"n": 0}
    real = Resident.offload

    def interrupted(self, unit):
        calls["n"] += 1
        if calls["n"] == 2:  # one unit already written to the temporary directory
            raise KeyboardInterrupt
        return real(self, unit)

    monkeypatch.setattr(Resident, "offload", interrupted)
    before = _digest(ckpt)
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    rc = _apply(s, tmp_path / "out", "--stream", "on")
    assert rc not in (0, 1, 2)  # the interrupt exit code, not success, bug or user error
    assert "interrupted" in capsys.readouterr().err.lower()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _digest(ckpt) == before


def test_python_api_device_and_stream(ckpt, tmp_path, monkeypatch):
    import surgery
    from surgery.diagnostics import SurgeryError

    text = "surgery 1\n" + textwrap.dedent(RTN.format(ckpt=ckpt))
    res = surgery.apply(None, text, stream="on", output=tmp_path / "out")
    assert res.report.streamed["blocks"] == 2
    assert res.report.streamed["peak_rss_bytes"] > 0
    assert all(p.device.type == "meta" for p in res.model.parameters())  # weights are on disk
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SurgeryError) as e:
        surgery.apply(None, text, device="cuda:0", output=tmp_path / "out2")
    assert e.value.diagnostics[0].code.value == "E0901"


def test_in_memory_save_shards_above_max_shard_size(ckpt, tmp_path):
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert _apply(s, tmp_path / "one", "--stream", "off") == 0
    assert _apply(s, tmp_path / "many", "--stream", "off", "--max-shard-size", "40KB") == 0
    assert (tmp_path / "one" / "model.safetensors").exists()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    _same(_weights(tmp_path / "one"), _weights(tmp_path / "many"))
    import surgery

    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(surgery.load(tmp_path / "one")(ids).logits,
                       surgery.load(tmp_path / "many")(ids).logits)


def test_auto_streams_when_the_in_memory_estimate_exceeds_the_budget(ckpt, tmp_path, capsys):
    s = _script(tmp_path, RTN.format(ckpt=ckpt))
    assert main(["plan", str(s), "--format", "json"]) == 0
    est = json.loads(capsys.readouterr().out)["memory"]
    between = (est["host_streamed_bytes"] + est["host_in_memory_bytes"]) // 2
    assert main(["apply", str(s), "-o", str(tmp_path / "a"), "--format", "json",
                 "--max-memory", str(between)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["streamed"]["estimate"]["host_streamed_bytes"] == est["host_streamed_bytes"]
    assert main(["apply", str(s), "-o", str(tmp_path / "b"), "--format", "json"]) == 0
    assert "streamed" not in json.loads(capsys.readouterr().out)  # fits: in memory
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_gptq_on_the_first_block_only_streams_identically(ckpt, tmp_path):
    s = _script(tmp_path, f"""
        model base = "hf:{ckpt}"
        data calib = corpus("pydoc", samples=4, seqlen=32)
        quantize modules("model.layers.0.*") to int4 using gptq(data=calib, group=32)
    """)
    assert _apply(s, tmp_path / "mem", "--stream", "off") == 0
    assert _apply(s, tmp_path / "str", "--stream", "on") == 0
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "str")
    _same(mem, streamed)
    assert "model.layers.1.mlp.down_proj.weight" in streamed  # the untouched block is written
    assert streamed["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
