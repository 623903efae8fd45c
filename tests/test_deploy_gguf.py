"""`export gguf`: llama-cpp-python loads what we write and computes our model.

Fast tests on a tiny LLaMA (with a byte-level BPE tokenizer that has merges, as llama.cpp
needs); the SmolLM2 round trip with perplexities is marked slow (docs/bench/deploy.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import surgery
from surgery.diagnostics import SurgeryError

gguf = pytest.importorskip("gguf", reason="export gguf needs the gguf package")


def _llama_cpp():
    """llama-cpp-python (PyPI has it only as C++ source, so CI may lack it): the tests that run
    the file in llama.cpp skip without it; those that read the file back with `gguf` do not."""
    return pytest.importorskip("llama_cpp", reason="running GGUF files needs llama-cpp-python")

BODY = 'type(Linear) - modules("lm_head")'
VOCAB = 320


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from surgery.data import pydoc_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([pydoc_text()[:50_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    d = tmp_path_factory.mktemp("gguf") / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


def _export(base, tmp_path, lines: str, type_: str = "auto"):
    out = tmp_path / "m.gguf"
    res = surgery.apply(None, f'model base = "hf:{base}"\n{lines}\n'
                              f'export gguf(type={type_}) "{out}"\n')
    return res, out, res.report.steps[-1].report


def _ids(base, n=48) -> list[int]:
    from transformers import AutoTokenizer

    from surgery.data import pydoc_text

    return AutoTokenizer.from_pretrained(base)(pydoc_text()[5000:8000])["input_ids"][:n]


def _llama_logits(path, ids) -> np.ndarray:
    llm = _llama_cpp().Llama(str(path), logits_all=True, n_ctx=128, n_threads=1, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _ours(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _reader_codes(path, name):
    r = gguf.GGUFReader(str(path))
    (t,) = [t for t in r.tensors if t.name == name]
    return t


def test_f16_logits_match_and_tokenizer_round_trips(base, tmp_path):
    res, out, rep = _export(base, tmp_path, "", "f16")
    ids = _ids(base)
    ours, theirs = _ours(res.model, ids), _llama_logits(out, ids)
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert rel < 2e-3, rel  # fp16 weights
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    from surgery.data import pydoc_text

    text = pydoc_text()[5000:5400]
    llm = _llama_cpp().Llama(str(out), n_ctx=128, verbose=False, vocab_only=True)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(base)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf(text)["input_ids"]
    assert llm.detokenize(hf(text)["input_ids"]).decode() == text
    assert rep.metrics["vocab"]["pre"] == "gpt-2" and rep.metrics["types"]["F16"] == 15


@pytest.mark.parametrize("quant, ggml, bits", [
    ("int4 using rtn(group=32, symmetric=true)", "Q4_0", 4),
    ("int4 using rtn(group=64, symmetric=false)", "Q4_1", 4),
    ("int8 using rtn(group=32)", "Q8_0", 8),
    ("int8", "Q8_0", 8),  # per-channel (64 inputs = 2 blocks sharing one scale)
])
def test_quantized_codes_are_carried_exactly(base, tmp_path, quant, ggml, bits):
    res, out, rep = _export(base, tmp_path, f"quantize {BODY} to {quant}")
    assert rep.metrics["types"][ggml] == 14 and rep.metrics["carried"] == 14
    assert rep.metrics["requantized"] == 0
    # the codes in the file are ours: compare one non-rope tensor block by block
    q = res.model.get_submodule("model.layers.1.mlp.down_proj")
    t = _reader_codes(out, "blk.1.ffn_down.weight")
    deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[ggml])
    ref = q.dequantized_weight().numpy()
    # only the fp16 rounding of the scales (and Q4_1's offsets m = -z * s) differs
    atol = 1e-7 if ggml != "Q4_1" else 2 ** -10 * np.abs(ref).max()
    assert np.allclose(deq.reshape(ref.shape), ref, rtol=2 ** -10, atol=atol)
    ids = _ids(base)
    ours, theirs = _ours(res.model, ids), _llama_logits(out, ids)
    # llama.cpp also quantizes activations to 8 bits for these types
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 0.05
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_requantizing_reports_the_added_error(base, tmp_path):
    res, out, rep = _export(base, tmp_path, "", "q4_0")
    assert rep.metrics["requantized"] == 14 and rep.metrics["types"]["Q4_0"] == 14
    err = rep.metrics["max_rel_weight_error_requantized"]
    assert 0.01 < err < 0.2  # 4-bit blocks of random weights: about 10 %
    assert any("requantised to Q4_0" in n for n in rep.notes)
    # the reported error is the file's: dequantise what was written
    t = _reader_codes(out, "blk.0.ffn_up.weight")
    w = res.model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().numpy()
    deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q4_0)
    rel = np.linalg.norm(deq.reshape(w.shape) - w) / np.linalg.norm(w)
    assert rel <= err + 1e-7
    assert _llama_logits(out, _ids(base, 8)).shape == (8, VOCAB)


def test_act_order_layers_are_requantized(base, tmp_path):
    res, out, rep = _export(
        base, tmp_path, 'data calib = corpus("pydoc", samples=4, seqlen=32)\n'
                        f"quantize {BODY} to int4 using gptq(data=calib, group=32, act_order=true)")
    assert rep.metrics["requantized"] == 14 and rep.metrics["carried"] == 0


def test_pruned_and_merged_models_export(base, tmp_path):
    res, out, rep = _export(base, tmp_path, f"prune {BODY} to 2:4 using magnitude()\n"
                                            f"quantize {BODY} to int8 using rtn(group=32)")
    t = _reader_codes(out, "blk.0.ffn_gate.weight")
    deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0)
    assert (deq.reshape(-1, 4) == 0).sum(-1).min() >= 2  # 2:4 zeros stay exact zeros
    res, out, rep = _export(base, tmp_path / "lora",
                            'adapt modules("**.q_proj") with lora(r=4)\nmerge adapters', "f32")
    ids = _ids(base)
    ours, theirs = _ours(res.model, ids), _llama_logits(out, ids)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 1e-3  # f32: float rounding only


@pytest.mark.parametrize("lines, module", [
    ("swap softmax in type(LlamaAttention) for stablemax", "model.layers.0.self_attn"),
    ('adapt modules("**.q_proj") with lora(r=4)', "model.layers.0.self_attn.q_proj"),
])
def test_unrepresentable_models_are_refused_at_the_statement(base, tmp_path, lines, module):
    with pytest.raises(SurgeryError) as e:
        _export(base, tmp_path, lines)
    (d,) = e.value.diagnostics
    assert d.code == "E0810" and f"cannot represent `{module}" in d.message
    assert "export gguf" in e.value.render()  # the span points at the export statement
    assert not (tmp_path / "m.gguf").exists()


def test_other_architectures_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    with pytest.raises(SurgeryError) as e:
        _export(d, tmp_path, "")
    assert e.value.diagnostics[0].code == "E0811" and "gpt2" in e.value.diagnostics[0].message


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    x = torch.from_numpy(logits[:-1])
    return math.exp(float(torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:]))))


@pytest.mark.slow
@pytest.mark.parametrize("lines, type_, max_rel, min_top1", [
    ("", "f16", 5e-3, 0.99),
    (f"quantize {BODY} to int8 using rtn(group=32)", "auto", 0.1, 0.9),
    (f"quantize {BODY} to int4 using rtn(group=32, symmetric=true)", "auto", 0.1, 0.9),
])
def test_smollm2_round_trip(tmp_path, lines, type_, max_rel, min_top1):
    """SmolLM2-135M: llama.cpp's logits and perplexity against ours on 256 pydoc tokens, and
    greedy decoding of 32 tokens from 3 prompts."""
    from transformers import AutoTokenizer

    from surgery.data import pydoc_text
    from surgery.models import local_dir

    out = tmp_path / "m.gguf"
    res = surgery.apply(None, f'model base = "zoo:smollm2-135m"\n{lines}\n'
                              f'export gguf(type={type_}) "{out}"\n')
    tok = AutoTokenizer.from_pretrained(local_dir("zoo:smollm2-135m"))
    ids = tok(pydoc_text()[20000:30000])["input_ids"][:256]
    ours, theirs = _ours(res.model, ids), _llama_logits_ctx(out, ids, 512)
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    print(f"\n{type_} {lines!r}: ppl ours {_ppl(ours, ids):.4f} llama.cpp {_ppl(theirs, ids):.4f} "
          f"max rel {rel:.2e} top1 {top1:.4f}")
    assert rel < max_rel and top1 >= min_top1
    assert abs(_ppl(ours, ids) / _ppl(theirs, ids) - 1) < 0.02
    llm = _llama_cpp().Llama(str(out), n_ctx=256, n_threads=1, verbose=False)
    same = 0
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        p = tok(prompt)["input_ids"]
        with torch.no_grad():
            g = res.model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)
        ref = g[0, len(p):].tolist()
        got = []
        for t in llm.generate(p, top_k=1, temp=0.0, reset=True):
            got.append(t)
            if len(got) == len(ref):
                break
        same += got == ref
        print(f"  {prompt!r}: greedy 32 tokens equal: {got == ref}")
    assert same >= (3 if type_ == "f16" else 1)


def _llama_logits_ctx(path, ids, n_ctx):
    llm = _llama_cpp().Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False,
                          n_batch=n_ctx)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def test_byte_only_bpe_without_merges_is_refused(tmp_path):
    """The 256-token tiny tokenizer has no merges, and llama.cpp refuses a BPE without them."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    d = tmp_path / "bytes"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    with pytest.raises(SurgeryError) as e:
        _export(d, tmp_path, "", "f32")
    assert e.value.diagnostics[0].code == "E0812" and "merges" in e.value.diagnostics[0].message
    assert not (tmp_path / "m.gguf").exists()


def test_k_quants_go_through_llama_cpps_quantizer(base, tmp_path):
    _llama_cpp()
    res, out, rep = _export(base, tmp_path, "", "q4_k")
    assert rep.metrics["requantized"] >= 14  # every block weight left f16 for a quantized type
    assert "F16" not in {t for t, n in rep.metrics["types"].items() if n >= 14}
    assert 0 < rep.metrics["max_rel_weight_error_requantized"] < 0.3
    ids = _ids(base, 16)
    ours, theirs = _ours(res.model, ids), _llama_logits(out, ids)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 0.2
