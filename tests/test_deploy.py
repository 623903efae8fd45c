"""Saved directories in plain transformers: every kind of `save` output either loads with our
logits or is refused with a message naming surgery.load. Never silently wrong.

The plain loads run in one subprocess that asserts `surgery` is never imported there, so nothing
of ours (no registered module type, no patched class) can help transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import surgery
from surgery.deploy import hf_dir

pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the test extra")

BODY = 'type(Linear) - modules("lm_head")'
DATA = 'data calib = corpus("pydoc", samples=4, seqlen=32)\n'

# name -> (script lines, expected layout)
CASES = {
    "int8": (f"quantize {BODY} to int8", "compressed-tensors"),
    "int8-asym-g32": (f"quantize {BODY} to int8 using rtn(group=32, symmetric=false)",
                      "compressed-tensors"),
    "int4-rtn-sym-g16": (f"quantize {BODY} to int4 using rtn(group=16, symmetric=true)",
                         "compressed-tensors"),
    "int4-rtn-asym-channel": (f"quantize {BODY} to int4 using rtn()", "compressed-tensors"),
    "int4-gptq-g16": (DATA + f"quantize {BODY} to int4 using gptq(data=calib, group=16)",
                      "compressed-tensors"),
    "int4-gptq-actorder-static": (
        DATA + f"quantize {BODY} to int4 using gptq(data=calib, group=16, act_order=true, "
               "static_groups=true)", "compressed-tensors"),
    "int4-gptq-actorder-channel": (
        DATA + f"quantize {BODY} to int4 using gptq(data=calib, act_order=true)",
        "compressed-tensors"),
    "int4-gptq-actorder-grouped": (
        DATA + f"quantize {BODY} to int4 using gptq(data=calib, group=16, act_order=true)",
        "surgery-only"),
    "int2-rtn-asym-g16": (f"quantize {BODY} to int2 using rtn(group=16)", "compressed-tensors"),
    "int3-gptq-g16": (DATA + f"quantize {BODY} to int3 using gptq(data=calib, group=16)",
                      "compressed-tensors"),
    "int5-rtn-sym-channel": (f"quantize {BODY} to int5 using rtn(symmetric=true)",
                             "compressed-tensors"),
    "int6-rtn-asym-g32": (f"quantize {BODY} to int6 using rtn(group=32)", "compressed-tensors"),
    "2:4": (f"prune {BODY} to 2:4 using magnitude()", "hf"),
    "2:4+int4": (f"prune {BODY} to 2:4 using magnitude()\n"
                 f"quantize {BODY} to int4 using rtn(group=16)", "compressed-tensors"),
    "unstructured": (f"prune {BODY} to 50% using magnitude()", "hf"),
    "swap-stablemax": ("swap softmax in type(LlamaAttention) for stablemax", "surgery-only"),
    "lora-unmerged": ('adapt modules("**.q_proj", "**.v_proj") with lora(r=4)', "surgery-only"),
    "bone-unmerged": ('adapt modules("**.q_proj") with bone(block=16)', "surgery-only"),
    "lora-merged": ('adapt modules("**.q_proj") with lora(r=4)\nmerge adapters', "hf"),
    "merged-models": ("merge base, donor using linear(weights=[0.7, 0.3])", "hf"),
}

PLAIN_LOADER = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    ids = torch.load(sys.argv[1])
    out = {}
    for d in sys.argv[2:]:
        res = {}
        for cls in (AutoModelForCausalLM, LlamaForCausalLM):
            try:
                m = cls.from_pretrained(d).eval()
                with torch.no_grad():
                    torch.save(m(ids).logits, f"{d}/plain-{cls.__name__}.pt")
                res[cls.__name__] = {"loaded": True}
            except Exception as e:
                res[cls.__name__] = {"loaded": False, "error": f"{type(e).__name__}: {e}"}
        out[d] = res
    assert "surgery" not in sys.modules, "the plain load imported surgery"
    print(json.dumps(out))
''')


def _donor(tmp: Path) -> Path:
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(1)
    d = tmp / "donor"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every case saved from one tiny LLaMA, its logits under surgery.load, and what plain
    transformers made of each directory."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    tmp = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    base = tmp / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    donor = _donor(tmp)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp / "ids.pt")
    results = {}
    for name, (lines, _) in CASES.items():
        out = tmp / name.replace(":", "_").replace("+", "_")
        text = (f'model base = "hf:{base}"\nmodel donor = "hf:{donor}"\n{lines}\n'
                f'save "{out}"\n')
        res = surgery.apply(None, text)
        loaded = surgery.load(out)
        with torch.no_grad():
            ours = loaded(ids).logits
            applied = res.model(ids).logits
        results[name] = {"dir": out, "ours": ours, "applied": applied,
                         "state": res.model.state_dict(), "loaded_state": loaded.state_dict()}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(tmp / "ids.pt"),
                           *[str(r["dir"]) for r in results.values()]],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results.values():
        r["plain"] = plain[str(r["dir"])]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_surgery_load_is_bit_exact(outputs, name):
    r = outputs[name]
    assert torch.equal(r["ours"], r["applied"])
    assert r["state"].keys() == r["loaded_state"].keys()
    for k, v in r["state"].items():
        assert torch.equal(v, r["loaded_state"][k]), k


@pytest.mark.parametrize("name", list(CASES))
def test_plain_transformers_loads_correctly_or_refuses(outputs, name):
    r = outputs[name]
    layout = json.loads((r["dir"] / "surgery.json").read_text())["weights"]["layout"]
    assert layout == CASES[name][1]
    auto, explicit = r["plain"]["AutoModelForCausalLM"], r["plain"]["LlamaForCausalLM"]
    if layout == "surgery-only":
        assert not auto["loaded"] and not explicit["loaded"]
        assert "surgery.load" in auto["error"], auto["error"]
        assert not (r["dir"] / "model.safetensors").exists()  # nothing for LlamaForCausalLM
        return
    for cls in ("AutoModelForCausalLM", "LlamaForCausalLM"):
        assert r["plain"][cls]["loaded"], r["plain"][cls]
        logits = torch.load(r["dir"] / f"plain-{cls}.pt")
        rel = float((logits - r["ours"]).abs().max() / r["ours"].abs().max())
        assert rel <= 1e-5, (cls, rel)


def test_compressed_tensors_config_describes_each_scheme(outputs):
    cfg = json.loads((outputs["int4-rtn-sym-g16"]["dir"] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and q["ignore"] == ["lm_head"]
    assert {"num_bits": 4, "group_size": 16, "strategy": "group", "symmetric": True,
            "type": "int"}.items() <= group["weights"].items()
    asym = json.loads((outputs["int4-rtn-asym-channel"]["dir"] / "config.json").read_text())
    (w,) = [g["weights"] for g in asym["quantization_config"]["config_groups"].values()]
    assert w["strategy"] == "channel" and w["symmetric"] is False and w["group_size"] is None


def test_surgery_only_parts_are_kept_apart(outputs):
    from safetensors import safe_open

    d = outputs["2:4"]["dir"]
    with safe_open(str(d / "surgery.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.endswith(".weight_mask_bits") for k in keys)
    for case, present in (("2:4", "model.layers.0.mlp.up_proj.weight"),
                          ("2:4+int4", "model.layers.0.mlp.up_proj.weight_packed")):
        with safe_open(str(outputs[case]["dir"] / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert present in names
        assert not any(n.endswith((".qweight", ".weight_values", ".weight_mask")) for n in names)
    manifest = json.loads((outputs["swap-stablemax"]["dir"] / "surgery.json").read_text())
    reasons = manifest["weights"]["no_standard_form"]
    assert any("softmax" in why for why in reasons.values())
    grouped = json.loads((outputs["int4-gptq-actorder-grouped"]["dir"] / "surgery.json")
                         .read_text())["weights"]["no_standard_form"]
    assert all("static_groups=true" in why for why in grouped.values())


def test_refusing_config_round_trips():
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8}
    refused = hf_dir.refusing_config(cfg)
    assert refused["model_type"] == hf_dir.REFUSED_MODEL_TYPE
    assert hf_dir.base_config(refused) == cfg


def test_surgery_only_output_is_reported_clearly_as_hf_input(outputs):
    from surgery.diagnostics import SurgeryError
    from surgery.models import load_model

    with pytest.raises(SurgeryError) as e:
        load_model(f"hf:{outputs['swap-stablemax']['dir']}")
    assert "surgery.load" in e.value.render()


def test_save_keeps_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(base)
    out = tmp_path / "out"
    surgery.apply(None, f'model base = "hf:{base}"\nquantize {BODY} to int8\nsave "{out}"\n')
    assert (out / "chat_template.jinja").exists() and (out / "tokenizer.json").exists()
    got = AutoTokenizer.from_pretrained(out)
    assert got.chat_template == tok.chat_template
    assert got("int8 keeps its tokenizer") == tok("int8 keeps its tokenizer")


PLAIN_PPL = textwrap.dedent('''
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    ids = torch.load(sys.argv[1])
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
    load_s = time.perf_counter() - t
    with torch.no_grad():
        logits = torch.cat([m(ids[i:i + 4]).logits for i in range(0, len(ids), 4)])
    torch.save(logits, sys.argv[2] + "/plain-logits.pt")
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert "surgery" not in sys.modules
    print(json.dumps({"ppl": float(ce.exp()), "load_s": load_s}))
''')


@pytest.mark.slow
@pytest.mark.parametrize("lines", [
    f"quantize {BODY} to int4 using rtn(group=64)",
    f'prune modules("model.layers.*.mlp.*_proj") to 2:4 using magnitude()\n'
    f"quantize {BODY} to int4 using rtn(group=64, symmetric=true)",
], ids=["int4-asym-g64", "2:4+int4-sym-g64"])
def test_smollm2_compressed_tensors_in_plain_transformers(tmp_path, lines):
    from surgery.data import corpus
    from surgery.evaluate import perplexity
    from surgery.models import load_tokenizer

    out = tmp_path / "out"
    res = surgery.apply(None, f'model base = "zoo:smollm2-135m"\n{lines}\nsave "{out}"\n')
    assert json.loads((out / "surgery.json").read_text())["weights"]["layout"] == \
        "compressed-tensors"
    ids = corpus(load_tokenizer(out), "pydoc", samples=16, seqlen=256).calibration
    torch.save(ids, tmp_path / "ids.pt")
    loaded = surgery.load(out)
    ours = perplexity(loaded, ids)
    proc = subprocess.run([sys.executable, "-c", PLAIN_PPL, str(tmp_path / "ids.pt"), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        mine = torch.cat([loaded(ids[i:i + 4]).logits for i in range(0, len(ids), 4)])
    theirs = torch.load(out / "plain-logits.pt")
    rel = float((theirs - mine).abs().max() / mine.abs().max())
    print(f"\n{lines!r}: ppl ours {ours:.4f}, plain transformers {plain['ppl']:.4f}, "
          f"max rel logit diff {rel:.2e}, plain load {plain['load_s']:.1f}s, "
          f"model.safetensors {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")
    assert rel <= 1e-5
    assert abs(plain["ppl"] - ours) / ours < 1e-4


def test_encoder_int4_in_plain_automodel(tmp_path):
    """MiniLM (BERT): quantized and pruned layers load in plain AutoModel with our outputs."""
    out = tmp_path / "minilm"
    surgery.apply(None, 'model base = "zoo:minilm-l6"\n'
                        'prune modules("encoder.layer.*.intermediate.dense") to 2:4 using magnitude()\n'
                        f'quantize type(Linear) to int4 using rtn(group=32)\nsave "{out}"\n')
    ids = torch.randint(100, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = surgery.load(out)(input_ids=ids).last_hidden_state
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f'''
        import sys, torch
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(out)!r}).eval()
        with torch.no_grad():
            torch.save(m(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).last_hidden_state,
                       {str(tmp_path / "plain.pt")!r})
        assert "surgery" not in sys.modules
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    assert float((plain - ours).abs().max() / ours.abs().max()) <= 1e-5


def test_without_compressed_tensors_quantized_output_is_refused_not_wrong(tmp_path, monkeypatch):
    from surgery.deploy import compressed_tensors as ct
    from surgery.diagnostics import SurgeryError
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    monkeypatch.setattr(ct, "available", lambda: False)
    out = tmp_path / "out"
    res = surgery.apply(None, f'model base = "hf:{base}"\nquantize {BODY} to int8\nsave "{out}"\n')
    weights = json.loads((out / "surgery.json").read_text())["weights"]
    assert weights["layout"] == "surgery-only"
    assert all("pip install compressed-tensors" in w for w in weights["no_standard_form"].values())
    assert json.loads((out / "config.json").read_text())["model_type"] == hf_dir.REFUSED_MODEL_TYPE
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(surgery.load(out)(ids).logits, res.model(ids).logits)
    # a compressed-tensors directory read without the package: a diagnostic, not a traceback
    monkeypatch.setattr(ct, "available", lambda: True)
    out2 = tmp_path / "out2"
    surgery.apply(None, f'model base = "hf:{base}"\nquantize {BODY} to int8\nsave "{out2}"\n')
    monkeypatch.setattr(ct, "available", lambda: False)
    with pytest.raises(SurgeryError) as e:
        surgery.load(out2)
    assert e.value.codes == ["E0600"] and "compressed-tensors" in e.value.render()
