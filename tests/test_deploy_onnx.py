"""`export onnx(kv_cache=true)` and encoder graphs with an attention mask, run in ONNX Runtime.

optimum's ORTModelForCausalLM could not be tested here: optimum-onnx 0.1.0 requires
transformers < 4.58 (this project runs 5.24; its import fails on `get_parameter_dtype`), so greedy
generation is driven with ONNX Runtime directly and compared with transformers' `generate`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import surgery
from surgery.diagnostics import SurgeryError

ort = pytest.importorskip("onnxruntime", reason="the ONNX round trips need onnxruntime")

BODY = 'type(Linear) - modules("lm_head")'


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    d = tmp_path_factory.mktemp("onnxkv") / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _kv_export(base, out, lines="", opts="kv_cache=true"):
    res = surgery.apply(None, f'model base = "hf:{base}"\n{lines}\n'
                              f'export onnx({opts}) "{out}/model.onnx"\n')
    return res, res.report.steps[-1].report


@pytest.fixture(scope="module")
def fp32(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-fp32")
    return (*_kv_export(base, out), out)


def _generate(model, prompt, n):
    """transformers' greedy tokens (it stops after EOS: compare ORT's first that many)."""
    with torch.no_grad():
        g = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    out = g[0, len(prompt):].tolist()
    assert len(out) >= n // 2  # enough tokens for the comparison to mean something
    return out


def test_decoder_graph_has_the_optimum_interface(fp32):
    from surgery.backends.onnx.export import ort_session

    res, rep, out = fp32
    sess = ort_session(out / "model.onnx")
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert list(outs)[0] == "logits" and outs["logits"] == ["batch", "sequence", 256]
    assert set(outs) == {"logits"} | {f"present.{i}.{k}" for i in range(2)
                                      for k in ("key", "value")}
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert rep.metrics["verified"] and rep.metrics["max_rel_diff"] < 1e-4


def test_ort_greedy_with_cache_equals_transformers(fp32):
    from surgery.backends.onnx.export import ort_session
    from surgery.backends.onnx.generation import CacheShape, ort_greedy

    res, _, out = fp32
    sess = ort_session(out / "model.onnx")
    for prompt in ([5, 17, 99, 3], [200, 1, 1, 7, 42, 8, 9]):
        ref = _generate(res.model, prompt, 16)
        assert ort_greedy(sess, CacheShape.of(res.model), prompt, 16)[:len(ref)] == ref


def test_left_padded_batch_with_cache_matches_unpadded(fp32):
    """One step over a left-padded batch gives each row's unpadded logits."""
    from surgery.backends.onnx.export import ort_session
    from surgery.backends.onnx.generation import CacheShape, decode_inputs

    res, _, out = fp32
    sess = ort_session(out / "model.onnx")
    shape = CacheShape.of(res.model)
    a, b = [5, 17, 99, 3, 8, 1], [200, 1, 7]
    ids = np.array([a, [0, 0, 0] + b])
    mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]])
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits = sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                             **decode_inputs(shape, 2, 0)})[0]
    with torch.no_grad():
        ref_b = res.model(torch.tensor([b])).logits[0].numpy()
        ref_a = res.model(torch.tensor([a])).logits[0].numpy()
    assert np.abs(logits[0] - ref_a).max() < 1e-4
    assert np.abs(logits[1, 3:] - ref_b).max() < 1e-4


@pytest.mark.parametrize("opts", ["kv_cache=true",
                                  pytest.param("kv_cache=true, int4=qdq", marks=pytest.mark.slow)])
def test_quantized_decoder_with_cache(base, tmp_path, opts):
    from surgery.backends.onnx.export import ort_session
    from surgery.backends.onnx.generation import CacheShape, ort_greedy

    res, rep = _kv_export(base, tmp_path, f"quantize {BODY} to int4 using rtn(group=32)", opts)
    ops = rep.metrics["ops"]
    assert ops.get("com.microsoft::MatMulNBits", 0) == 14 or ops.get("DequantizeLinear", 0) >= 14
    sess = ort_session(tmp_path / "model.onnx")
    prompt = [5, 17, 99, 3]
    ref = _generate(res.model, prompt, 12)
    assert ort_greedy(sess, CacheShape.of(res.model), prompt, 12)[:len(ref)] == ref


def test_kv_cache_on_an_encoder_is_refused(tmp_path):
    d = _tiny_bert(tmp_path)
    with pytest.raises(SurgeryError) as e:
        surgery.apply(None, f'model enc = "hf:{d}"\nexport onnx(kv_cache=true) "{tmp_path}/e.onnx"\n')
    assert e.value.diagnostics[0].code == "E0813"


def _tiny_bert(tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(d)
    return d


def _mean_pool(h, mask):
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / m.sum(1)


def test_encoder_padded_batch_matches_unpadded(tmp_path):
    from surgery.backends.onnx.export import ort_session

    d = _tiny_bert(tmp_path)
    res = surgery.apply(None, f'model enc = "hf:{d}"\nexport onnx "{tmp_path}/e.onnx"\n')
    sess = ort_session(tmp_path / "e.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask",
                                                  "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    rows = [[2, 50, 60, 70, 80, 3], [2, 9, 3]]
    ids = np.zeros((2, 6), np.int64)
    mask = np.zeros((2, 6), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    h = sess.run(None, {"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids)})[0]
    for i, r in enumerate(rows):
        one = np.array([r])
        alone = sess.run(None, {"input_ids": one, "attention_mask": np.ones_like(one),
                                "token_type_ids": np.zeros_like(one)})[0]
        assert np.abs(h[i, :len(r)] - alone[0]).max() < 1e-5
        a = _mean_pool(h[i:i + 1], mask[i:i + 1])[0]
        b = alone[0].mean(0)
        assert np.abs(a - b).max() < 1e-5
    with torch.no_grad():
        ref = res.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
                        ).last_hidden_state.numpy()
    assert np.abs(h - ref).max() < 1e-4


@pytest.mark.slow
def test_smollm2_kv_cache_graph(tmp_path):
    """SmolLM2-135M: greedy 32 tokens from 3 prompts through ORT with the cache equal
    transformers', and one decode step at a 512-token context is >= 10x faster with the cache
    than the cacheless graph (docs/bench/deploy.md has the measured numbers)."""
    import time

    from transformers import AutoTokenizer

    from surgery.backends.onnx import export_onnx
    from surgery.backends.onnx.export import ort_session
    from surgery.backends.onnx.generation import (CacheShape, decode_inputs,
                                                  export_decoder_with_cache, ort_greedy)
    from surgery.data import pydoc_text
    from surgery.models import load_model, local_dir

    model = load_model("zoo:smollm2-135m").model.eval()
    shape = CacheShape.of(model)
    export_decoder_with_cache(model, tmp_path / "kv.onnx")
    export_onnx(model, tmp_path / "nokv.onnx", example=torch.randint(0, 1000, (2, 16)))
    kv, nokv = ort_session(tmp_path / "kv.onnx", threads=1), ort_session(tmp_path / "nokv.onnx",
                                                                         threads=1)
    tok = AutoTokenizer.from_pretrained(local_dir("zoo:smollm2-135m"))
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        p = tok(prompt)["input_ids"]
        ref = _generate(model, p, 32)
        assert ort_greedy(kv, shape, p, 32)[:len(ref)] == ref, prompt
    ids = np.asarray([tok(pydoc_text()[20000:40000])["input_ids"][:513]])
    t0 = time.perf_counter()
    nokv.run(None, {"input_ids": ids})
    t_nokv = time.perf_counter() - t0
    out = kv.run(None, {"input_ids": ids[:, :512], "attention_mask": np.ones((1, 512), np.int64),
                        "position_ids": np.arange(512)[None], **decode_inputs(shape, 1, 0)})
    step = {"input_ids": ids[:, 512:], "attention_mask": np.ones((1, 513), np.int64),
            "position_ids": np.asarray([[512]]), **dict(zip(shape.names()[0], out[1:]))}
    t0 = time.perf_counter()
    kv.run(None, step)
    t_kv = time.perf_counter() - t0
    assert t_nokv / t_kv >= 10, (t_nokv, t_kv)


@pytest.mark.slow
def test_minilm_padded_batch_embeddings(tmp_path):
    from transformers import AutoTokenizer

    from surgery.backends.onnx.export import ort_session
    from surgery.models import local_dir

    surgery.apply(None, f'model enc = "zoo:minilm-l6"\nexport onnx "{tmp_path}/e.onnx"\n')
    sess = ort_session(tmp_path / "e.onnx")
    tok = AutoTokenizer.from_pretrained(local_dir("zoo:minilm-l6"))
    texts = ["A cat.", "The quick brown fox jumps over the lazy dog near the river bank."]
    batch = tok(texts, padding=True, return_tensors="np")
    names = [i.name for i in sess.get_inputs()]
    pooled = _mean_pool(sess.run(None, {n: batch[n].astype(np.int64) for n in names})[0],
                        batch["attention_mask"])
    for i, t in enumerate(texts):
        one = tok([t], return_tensors="np")
        a = sess.run(None, {n: one[n].astype(np.int64) for n in names})[0][0].mean(0)
        assert a @ pooled[i] / np.linalg.norm(a) / np.linalg.norm(pooled[i]) >= 0.9999


def test_onnxruntime_genai_generates_like_transformers(fp32, base):
    """onnxruntime-genai reads the directory (genai_config.json beside the graph) and its greedy
    tokens equal transformers' on the same weights."""
    og = pytest.importorskip("onnxruntime_genai",
                             reason="onnxruntime-genai is not installed (pip install "
                                    "onnxruntime-genai); the graph is still checked with ORT")
    from transformers import LlamaForCausalLM

    _, _, out = fp32
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model.onnx"
    prompt = [5, 17, 42, 9, 77, 3]
    want = _generate(LlamaForCausalLM.from_pretrained(base).eval(), prompt, 12)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(want), do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    got = list(gen.get_sequence(0))[len(prompt):]
    assert got[:len(want)] == want
