"""Model I/O: HF directories, save/load round trips, determinism, atomic outputs, refusals."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import load_model

SCRIPT = 'quantize type(Linear) - modules("lm_head") to int8\n'


def tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_hf_dir_loads(tiny_hf_dir):
    lm = load_model(f"hf:{tiny_hf_dir}")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.kind == "causal-lm"


def test_apply_save_load_bit_identical(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    text = f'model base = "hf:{tiny_hf_dir}"\n' + SCRIPT + f'save "{out}"\n'
    res = surgery.apply(None, text)
    loaded = surgery.load(out)
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = res.model(ids).logits
        b = loaded(ids).logits
    assert torch.equal(a, b)
    manifest = json.loads((out / "surgery.json").read_text())
    assert manifest["script"] == text
    assert manifest["plan"]["steps"][0]["method"] == "rtn"
    assert manifest["inputs"]["base"]["files"]["model.safetensors"]
    assert manifest["modules"]["model.layers.0.mlp.up_proj"]["type"] == "QuantLinear"
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    # tied embeddings are tied again after loading
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_same_script_twice_gives_identical_bytes(tiny_hf_dir, tmp_path):
    digests = []
    out = tmp_path / "out"
    for _ in range(2):  # the second run replaces the first artifact
        surgery.apply(None, f'model base = "hf:{tiny_hf_dir}"\n' + SCRIPT + f'save "{out}"\n')
        digests.append(tree_digest(out))
    assert digests[0]["model.safetensors"] == digests[1]["model.safetensors"]
    assert digests[0] == digests[1]  # the manifest and config too


def test_input_is_never_modified(tiny_hf_dir, tmp_path):
    before = tree_digest(tiny_hf_dir)
    surgery.apply(None, f'model base = "hf:{tiny_hf_dir}"\n' + SCRIPT + f'save "{tmp_path / "o"}"\n')
    assert tree_digest(tiny_hf_dir) == before


def test_failure_while_saving_leaves_no_artifact(tiny_hf_dir, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "out"
    before = tree_digest(tiny_hf_dir)

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        surgery.apply(None, f'model base = "hf:{tiny_hf_dir}"\n' + SCRIPT + f'save "{out}"\n')
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert tree_digest(tiny_hf_dir) == before


def test_killed_apply_leaves_no_artifact(tiny_hf_dir, tmp_path):
    """SIGKILL during saving: the output path never holds a partial artifact."""
    out = tmp_path / "out"
    script = tmp_path / "q.surg"
    script.write_text(f'model base = "hf:{tiny_hf_dir}"\n' + SCRIPT + f'save "{out}"\n')
    before = tree_digest(tiny_hf_dir)
    code = (
        "import sys, time, safetensors.torch as st\n"
        "real = st.save_file\n"
        "def slow(t, p, metadata=None):\n"
        "    real(t, p, metadata=metadata); open(sys.argv[2], 'w').close(); time.sleep(60)\n"
        "st.save_file = slow\n"
        "from surgery.cli import main\n"
        "main(['apply', sys.argv[1], '--quiet'])\n")
    flag = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", code, str(script), str(flag)])
    try:
        for _ in range(600):
            if flag.exists() or proc.poll() is not None:
                break
            import time
            time.sleep(0.1)
        assert flag.exists(), "the subprocess never reached saving"
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert tree_digest(tiny_hf_dir) == before


def test_pickle_weights_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(SurgeryError) as e:
        load_model(f"hf:{d}")
    assert e.value.codes == ["E0601"] and "--trust-pickle" in e.value.render()


def test_corrupt_checkpoint(tiny_hf_dir, tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SurgeryError) as e:
        load_model(f"hf:{d}")
    assert e.value.codes == ["E0603"]


def test_missing_model_dir_is_a_located_error(tmp_path):
    text = f'model base = "hf:{tmp_path / "nope"}"\nquantize type(Linear) to int8\n'
    with pytest.raises(SurgeryError) as e:
        surgery.compile(text).apply()
    d = e.value.diagnostics[0]
    assert d.code == "E0602" and d.span.line == 1


def test_plain_module_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    res = surgery.apply(net, f'quantize type(Linear) to int8\nsave "{tmp_path / "m"}"\n')
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    loaded = surgery.load(tmp_path / "m", model=fresh)
    x = torch.randn(3, 8)
    assert torch.equal(res.model(x), loaded(x))
    with pytest.raises(SurgeryError):
        surgery.load(tmp_path / "m")  # a plain module needs its constructor
