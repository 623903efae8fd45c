"""Deployable outputs on SmolLM2-135M / MiniLM-L6: ONNX decode with and without the KV cache,
encoder padding, and GGUF in llama.cpp (quality and speed).

    python benchmarks/deploy.py --part onnx     # decode step at a 512-token context, greedy
    python benchmarks/deploy.py --part minilm   # padded vs unpadded mean-pooled embeddings
    python benchmarks/deploy.py --part gguf     # perplexity and tokens/s in llama.cpp

Prints markdown rows for docs/bench/deploy.md. Single-threaded ORT / llama.cpp sessions.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BODY = 'type(Linear) - modules("lm_head")'


def _text_ids(n: int) -> list[int]:
    from transformers import AutoTokenizer

    from surgery.data import pydoc_text
    from surgery.models import local_dir

    tok = AutoTokenizer.from_pretrained(local_dir("zoo:smollm2-135m"))
    return tok(pydoc_text()[20000:60000])["input_ids"][:n]


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    x = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float32))
    return math.exp(float(torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:]))))


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def part_onnx(tmp: Path, ctx: int, reps: int) -> None:
    from surgery.backends.onnx import export_onnx, ort_session
    from surgery.backends.onnx.generation import (CacheShape, decode_inputs,
                                                  export_decoder_with_cache, ort_greedy)
    from surgery.models import load_model

    model = load_model("zoo:smollm2-135m").model.eval()
    shape = CacheShape.of(model)
    t0 = time.perf_counter()
    rep = export_decoder_with_cache(model, tmp / "kv.onnx")
    t_kv = time.perf_counter() - t0
    export_onnx(model, tmp / "nokv.onnx", example=torch.randint(0, 1000, (2, 16)))
    kv, nokv = ort_session(tmp / "kv.onnx", threads=1), ort_session(tmp / "nokv.onnx", threads=1)
    ids = _text_ids(ctx + 1)
    # without the cache, one decode step is a forward over the whole context + the new token
    full = np.asarray([ids], np.int64)
    t_nokv = _median_ms(lambda: nokv.run(None, {"input_ids": full}), reps)
    # with it: the context's keys/values come from the prompt step, the step feeds one token
    out = kv.run(None, {"input_ids": full[:, :ctx], "attention_mask": np.ones((1, ctx), np.int64),
                        "position_ids": np.arange(ctx)[None], **decode_inputs(shape, 1, 0)})
    past = dict(zip(shape.names()[0], out[1:]))
    step = {"input_ids": full[:, ctx:], "attention_mask": np.ones((1, ctx + 1), np.int64),
            "position_ids": np.asarray([[ctx]]), **past}
    t_kv_step = _median_ms(lambda: kv.run(None, step), reps * 3)
    with torch.no_grad():
        ref = model(torch.tensor([ids[:256]])).logits[0].numpy()
    got = kv.run(None, {"input_ids": full[:, :256], "attention_mask": np.ones((1, 256), np.int64),
                        "position_ids": np.arange(256)[None], **decode_inputs(shape, 1, 0)})[0][0]
    from transformers import AutoTokenizer

    from surgery.models import local_dir

    tok = AutoTokenizer.from_pretrained(local_dir("zoo:smollm2-135m"))
    same = 0
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        p = tok(prompt)["input_ids"]
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)
        ref = g[0, len(p):].tolist()  # generate stops after EOS: compare that many tokens
        same += ort_greedy(kv, shape, p, 32)[:len(ref)] == ref
    print(f"| SmolLM2 fp32, one decode step at {ctx} tokens of context | "
          f"{t_nokv:.0f} ms | {t_kv_step:.1f} ms | {t_nokv / t_kv_step:.0f}x |")
    print(f"export with cache: {t_kv:.0f} s, verified max rel diff {rep.max_rel_diff:.1e}; "
          f"ppl torch {_ppl(ref, ids[:256]):.4f} ORT {_ppl(got, ids[:256]):.4f}, "
          f"max abs logit diff {np.abs(got - ref).max():.2e}; greedy 32 tokens equal for "
          f"{same}/3 prompts; {(tmp / 'kv.onnx').stat().st_size / 2**20:.0f} MiB")


def part_minilm(tmp: Path) -> None:
    from transformers import AutoTokenizer

    from surgery.backends.onnx import ort_session
    from surgery.backends.onnx.generation import export_encoder
    from surgery.models import load_model, local_dir

    model = load_model("zoo:minilm-l6").model.eval()
    export_encoder(model, tmp / "enc.onnx")
    sess = ort_session(tmp / "enc.onnx", threads=1)
    tok = AutoTokenizer.from_pretrained(local_dir("zoo:minilm-l6"))
    texts = ["A cat.", "The quick brown fox jumps over the lazy dog near the river bank.",
             "Surgery compiles scripts.", "Embeddings of padded batches must not change."]
    batch = tok(texts, padding=True, return_tensors="np")
    names = [i.name for i in sess.get_inputs()]
    h = sess.run(None, {n: batch[n].astype(np.int64) for n in names})[0]
    m = batch["attention_mask"][..., None]
    pooled = (h * m).sum(1) / m.sum(1)
    cos = []
    for i, t in enumerate(texts):
        one = tok([t], return_tensors="np")
        a = sess.run(None, {n: one[n].astype(np.int64) for n in names})[0][0].mean(0)
        cos.append(float(a @ pooled[i] / np.linalg.norm(a) / np.linalg.norm(pooled[i])))
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    print(f"| MiniLM-L6, 4 sentences padded to {batch['input_ids'].shape[1]} tokens | min cosine "
          f"padded vs unpadded {min(cos):.7f} | max abs diff vs PyTorch {np.abs(h - ref).max():.1e} |")


def part_gguf(tmp: Path, reps: int) -> None:
    import ctypes

    import llama_cpp

    import surgery

    ids = _text_ids(512)
    rows = [("fp32 -> export gguf(type=f16)", "", "f16"),
            ("int8 RTN g32 sym -> Q8_0 (codes carried)", f"quantize {BODY} to int8 using rtn(group=32)", "auto"),
            ("int4 RTN g32 sym -> Q4_0 (codes carried)",
             f"quantize {BODY} to int4 using rtn(group=32, symmetric=true)", "auto"),
            ("int4 GPTQ g32 sym -> Q4_0 (codes carried)",
             'data calib = corpus("pydoc", samples=16, seqlen=256)\n'
             f"quantize {BODY} to int4 using gptq(data=calib, group=32, symmetric=true)", "auto")]
    f16 = None
    for label, lines, typ in rows:
        out = tmp / f"{len(label)}-{typ}.gguf"
        res = surgery.apply(None, f'model base = "zoo:smollm2-135m"\n{lines}\n'
                                  f'export gguf(type={typ}) "{out}"\n')
        with torch.no_grad():
            ours = res.model(torch.tensor([ids])).logits[0].numpy()
        _gguf_row(label, out, ids, _ppl(ours, ids), reps)
        if typ == "f16":
            f16 = out
        del res
    # llama.cpp's own Q4_0 of the float model (its quantizer, from our f16 file)
    q = tmp / "llamacpp-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q).encode(),
                                          ctypes.byref(params)) == 0
    _gguf_row("fp32 -> f16 GGUF -> llama.cpp's own llama-quantize Q4_0", q, ids, None, reps)


def _gguf_row(label, path, ids, ppl_ours, reps):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=1024, n_batch=512, n_threads=1,
                          n_threads_batch=1, verbose=False)
    llm.eval(ids)
    ppl = _ppl(np.array(llm.scores[:len(ids)]), ids)
    llm2 = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=1, n_threads_batch=1,
                           verbose=False)

    def decode():
        llm2.reset()
        llm2.eval(ids[:128])
        t0 = time.perf_counter()
        for t in ids[128:192]:
            llm2.eval([t])
        return 64 / (time.perf_counter() - t0)

    tps = statistics.median(decode() for _ in range(reps))
    mib = Path(path).stat().st_size / 2**20
    ours = f"{ppl_ours:.4f}" if ppl_ours is not None else "-"
    print(f"| {label} | {mib:.0f} MiB | {ours} | {ppl:.4f} | {tps:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["onnx", "minilm", "gguf"], required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="surgery-deploy-bench-") as tmp:
        {"onnx": lambda: part_onnx(Path(tmp), args.context, args.reps),
         "minilm": lambda: part_minilm(Path(tmp)),
         "gguf": lambda: part_gguf(Path(tmp), args.reps)}[args.part]()


if __name__ == "__main__":
    main()
