"""End to end on this CPU: SmolLM2-135M fp32 in PyTorch vs our int4 ONNX export in ONNX Runtime.

    python benchmarks/e2e_cpu.py [--group 64] [--threads 2] [--reps 10] [--windows 16]

Batch 1, 128 tokens (one forward over a 128-token prompt, no KV cache: the export maps input_ids
to logits). Reports median latency, tokens/s, file size, and perplexity on held-out pydoc windows
for: PyTorch fp32, ONNX Runtime fp32 export, ONNX Runtime int4 export (MatMulNBits, RTN asymmetric,
lm_head and embeddings kept fp32) at accuracy_level 0 (fp32 compute) and 4 (int8 activations).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _ppl(logits_fn, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = torch.as_tensor(logits_fn(w[None]))[0].float()
        nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    import surgery
    from surgery.backends.onnx.export import export_onnx, ort_session
    from surgery.data import corpus
    from surgery.models import load_model

    lm = load_model("zoo:smollm2-135m")
    model = lm.model.eval()
    ds = corpus(lm.tokenizer, "pydoc", samples=8, seqlen=128, seed=0)
    ids = ds.evaluation[:1]
    windows = ds.evaluation[: args.windows]
    rows = []

    with torch.no_grad():
        def torch_logits(x):
            return model(input_ids=x, use_cache=False).logits

        ms = _median_ms(lambda: torch_logits(ids), args.reps)
        rows.append({"runtime": "PyTorch fp32", "ms": ms, "MB": None,
                     "ppl": _ppl(torch_logits, windows)})

    tmp = Path(tempfile.mkdtemp(prefix="surgery-e2e-"))
    export_onnx(model, tmp / "fp32.onnx", example=ids)
    res = surgery.apply(model, f"""
quantize type(Linear) - modules("lm_head") to int4 using rtn(group={args.group})
export onnx "{tmp / 'int4.onnx'}"
""")
    export = next(s.report for s in res.report.steps if s.verb == "export")
    variants = [("ORT fp32 export", tmp / "fp32.onnx", 0),
                (f"ORT int4 (MatMulNBits g{args.group}, acc 0)", tmp / "int4.onnx", 0),
                (f"ORT int4 (MatMulNBits g{args.group}, acc 4)", tmp / "int4.onnx", 4)]
    for name, path, acc in variants:
        sess = ort_session(path, accuracy_level=acc, threads=args.threads)
        inp = sess.get_inputs()[0].name

        def ort_logits(x, sess=sess, inp=inp):
            return sess.run(None, {inp: x.numpy()})[0]

        ms = _median_ms(lambda: ort_logits(ids), args.reps)
        rows.append({"runtime": name, "ms": ms, "MB": path.stat().st_size / 2 ** 20,
                     "ppl": _ppl(ort_logits, windows)})

    base = rows[0]["ms"]
    cpu = platform.processor() or platform.machine()
    print(f"SmolLM2-135M, batch 1 x 128 tokens, {args.threads} threads, {cpu}, "
          f"torch {torch.__version__}")
    print(f"int4 export check vs PyTorch (quantized model): max rel diff "
          f"{export.metrics.get('max_rel_diff'):.2e}")
    print("| runtime | latency (ms) | tokens/s | speed-up | file (MB) | perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mb = "-" if r["MB"] is None else f"{r['MB']:.0f}"
        print(f"| {r['runtime']} | {r['ms']:.1f} | {128 / r['ms'] * 1e3:.0f} | "
              f"{base / r['ms']:.2f}x | {mb} | {r['ppl']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
