"""Quantisation benchmark on SmolLM2-135M: perplexity, time, size on disk, ORT vs PyTorch latency.

    python benchmarks/quantize.py [--configs fp32,int8,rtn4,gptq4,gptq4_act] [--no-onnx]

Perplexity: pydoc evaluation split, seqlen 512 (disjoint from the calibration samples).
Calibration (GPTQ): 64 random pydoc windows of 256 tokens from the calibration part, seed 0.
Targets: the 210 decoder Linear layers (``model.layers.*.*.*_proj``); embeddings and the tied
lm_head stay fp32. Latency: batch 1, 128 tokens, median of repeated forwards.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from surgery.data import corpus
from surgery.evaluate import perplexity
from surgery.models import load_model
from surgery.passapi import RunContext
from surgery.progress import Progress
from surgery.registry import get_pass

CONFIGS = {
    "fp32": ("fp32", None, {}),
    "int8": ("int8 RTN per-channel", "rtn", {"format": "int8"}),
    "rtn4": ("int4 RTN g64", "rtn", {"format": "int4", "group": 64}),
    "rtn4_clip": ("int4 RTN g64 clip", "rtn", {"format": "int4", "group": 64, "clip": True}),
    "gptq4": ("int4 GPTQ g64", "gptq", {"format": "int4", "group": 64, "data": "calib"}),
    "gptq4_act": ("int4 GPTQ g64 act_order", "gptq",
                  {"format": "int4", "group": 64, "data": "calib", "act_order": True}),
    "gptq4_clip": ("int4 GPTQ g64 clip", "gptq",
                   {"format": "int4", "group": 64, "data": "calib", "clip": True}),
    "gptq4_ts": ("int4 GPTQ g64 true_sequential", "gptq",
                 {"format": "int4", "group": 64, "data": "calib", "true_sequential": True}),
}


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


def disk_size(model: nn.Module) -> int:
    from surgery.emit import WEIGHTS, save

    with tempfile.TemporaryDirectory() as d:
        save(model, Path(d) / "m", {"script": "benchmark"})
        return (Path(d) / "m" / WEIGHTS).stat().st_size


def latency(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def ort_latency(model, ids, repeats, int4, tmp) -> tuple[float, float]:
    """ONNX Runtime latency (ms) and max relative logit difference vs PyTorch."""
    import numpy as np

    from surgery.backends.onnx import export_onnx, ort_session

    path = Path(tmp) / "model.onnx"
    export_onnx(model, path, example=ids, int4=int4, verify=False, dynamic=False)
    sess = ort_session(path, threads=torch.get_num_threads())
    feed = {sess.get_inputs()[0].name: ids.numpy()}
    out = sess.run(None, feed)[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    return latency(lambda: sess.run(None, feed), repeats), rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="fp32,int8,rtn4,gptq4,gptq4_act")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity (latency/size only)")
    ap.add_argument("--int4-onnx", default="matmulnbits", choices=["matmulnbits", "qdq"])
    args = ap.parse_args()
    torch.manual_seed(0)

    lm = load_model("zoo:smollm2-135m")
    evalset = corpus(lm.tokenizer, "pydoc", samples=1, seqlen=512, seed=0,
                     eval_windows=args.eval_windows)
    calib = corpus(lm.tokenizer, "pydoc", samples=args.samples, seqlen=args.calib_seqlen, seed=0,
                   name="calib")
    ids = evalset.evaluation[:1, :128].clone()
    print(f"machine: {platform.machine()} {os.cpu_count()}-core CPU, torch threads "
          f"{torch.get_num_threads()}, no GPU; torch {torch.__version__}; load average at "
          f"start {os.getloadavg()[0]:.1f}")
    print(f"eval: {evalset.evaluation.numel()} tokens (seqlen 512); calibration: "
          f"{calib.calibration.shape[0]} x {calib.calibration.shape[1]} tokens\n")

    rows = []
    base_ppl = None
    for key in args.configs.split(","):
        label, method, kw = CONFIGS[key]
        model = copy.deepcopy(lm.model).eval()
        secs = cpu = 0.0
        if method:
            P = get_pass("quantize", method)
            p = P(P.Params(**kw))
            ctx = RunContext(model=model, models={}, data={"calib": calib}, progress=Progress())
            t0, c0 = time.perf_counter(), time.process_time()
            p.run(ctx, decoder_linears(model))
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        ppl = float("nan") if args.no_ppl else perplexity(model, evalset.evaluation)
        base_ppl = base_ppl or ppl
        size = disk_size(model)
        with torch.no_grad():
            pt_ms = latency(lambda: model(input_ids=ids), args.repeats)
        ort_ms = rel = None
        if not args.no_onnx:
            with tempfile.TemporaryDirectory() as tmp:
                ort_ms, rel = ort_latency(model, ids, args.repeats, args.int4_onnx, tmp)
        rows.append((label, ppl, ppl / base_ppl, secs, cpu, size, pt_ms, ort_ms, rel))
        print(f"done: {label}: ppl {ppl:.3f}, quantize {secs:.1f} s wall / {cpu:.1f} s CPU, "
              f"{size / 2**20:.1f} MB, PyTorch {pt_ms:.1f} ms, ORT {ort_ms} ms, rel {rel}",
              flush=True)
        del model

    print("\n| config | ppl | vs fp32 | quantize wall s | quantize CPU s | disk MB | PyTorch ms "
          "| ORT ms | ORT max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, ppl, ratio, secs, cpu, size, pt_ms, ort_ms, rel in rows:
        o = f"{ort_ms:.1f}" if ort_ms is not None else "-"
        r = f"{rel:.1e}" if rel is not None else "-"
        print(f"| {label} | {ppl:.3f} | {ratio:.3f}x | {secs:.1f} | {cpu:.1f} | {size / 2**20:.1f} | "
              f"{pt_ms:.1f} | {o} | {r} |")


if __name__ == "__main__":
    main()
