"""Loss-plus-backward peak memory and time of Cut Cross-Entropy against F.cross_entropy on full
logits, at SmolLM2's head shape (hidden 576, vocabulary 49,152), side by side in one run.

Each measurement runs in a fresh subprocess so peak RSS (CPU) is its own: the figure is the peak
resident set size during loss + backward minus the resident size just before, with the inputs
(hidden states, head weight, labels) already allocated. On a GPU (--device cuda) it is
torch.cuda.max_memory_allocated over the same span. Methods alternate, medians are reported.

    python benchmarks/training.py                      # batch 8 x 2048 on CPU
    python benchmarks/training.py --tokens 4096 --repeats 3
    python benchmarks/training.py --device cuda
    python benchmarks/training.py --curves 100       # training curves, CCE vs full logits

``--curves N`` trains a small random LLaMA with SmolLM2's tokenizer and vocabulary (49,152)
through the `train` statement twice, `loss=cce` and `loss=full`, same seed and data, and compares
the loss logs step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch, torch.nn.functional as F
from surgery.backends.ops.cross_entropy import cut_cross_entropy
method, tokens, dim, vocab, device, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
h = torch.randn(tokens, dim, generator=g).to(device).requires_grad_()
w = (torch.randn(vocab, dim, generator=g) / dim ** 0.5).to(device).requires_grad_()
y = torch.randint(0, vocab, (tokens,), generator=g).to(device)

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def peak_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = rss_kb() * 1024
t0 = time.perf_counter()
if method == "cce":
    loss = cut_cross_entropy(h, w, y)
else:
    loss = F.cross_entropy(h @ w.T, y)
loss.backward()
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_kb() * 1024
print(json.dumps({"method": method, "loss": float(loss), "peak_delta": peak - base,
                  "seconds": seconds, "grad_norm": float(h.grad.norm())}))
"""


def run(method: str, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(args.tokens), str(args.dim),
                          str(args.vocab), args.device, str(args.threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


CURVE_SCRIPT = """surgery 1
data calib = corpus("pydoc", samples=256, seqlen={seqlen}, eval_windows=4)
train modules("**") on calib for {steps} steps using lm(lr=3e-3, batch={batch}, log_every=1, loss={loss})
"""


def curves(steps: int, batch: int, seqlen: int, threads: int) -> dict:
    """Loss logs of the same training with Cut Cross-Entropy and with full logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgery
    from surgery.models import LoadedModel, load_model

    torch.set_num_threads(threads)
    tokenizer = load_model("zoo:smollm2-135m").tokenizer
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                         max_position_embeddings=256, tie_word_embeddings=True)
    out = {}
    for loss in ("cce", "full"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        script = CURVE_SCRIPT.format(steps=steps, batch=batch, seqlen=seqlen, loss=loss)
        result = surgery.compile(script).apply(LoadedModel(model, "python:tiny-llama-49k",
                                                           tokenizer=tokenizer), seed=0)
        m = result.report.steps[-1].report.metrics
        out[loss] = {"loss": [e["loss"] for e in m["loss_log"]], "seconds": m["seconds"]}
    a, b = out["cce"]["loss"], out["full"]["loss"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return {"steps": steps, "batch": batch, "seqlen": seqlen, "threads": threads,
            "max_abs_diff": max(diffs), "final": {"cce": a[-1], "full": b[-1]},
            "first": {"cce": a[0], "full": b[0]},
            "seconds": {k: v["seconds"] for k, v in out.items()}, "curves": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--curves", type=int, metavar="STEPS", help="compare training curves instead")
    p.add_argument("--json", help="write the --curves result here")
    args = p.parse_args()
    if args.curves:
        r = curves(args.curves, batch=4, seqlen=64, threads=args.threads)
        load = os.getloadavg()[0]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, threads {args.threads}, "
              f"load average {load:.1f}")
        print(f"{r['steps']} steps, batch 4 x 64 tokens: first loss cce {r['first']['cce']:.6f} "
              f"full {r['first']['full']:.6f}; final cce {r['final']['cce']:.6f} full "
              f"{r['final']['full']:.6f}; max |difference| over the curve {r['max_abs_diff']:.2e}; "
              f"seconds cce {r['seconds']['cce']} full {r['seconds']['full']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
        return
    results: dict[str, list[dict]] = {"full": [], "cce": []}
    for _ in range(args.repeats):
        for method in ("full", "cce"):  # interleaved
            results[method].append(run(method, args))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}, "
          f"threads {args.threads}, load average {load:.1f}")
    print(f"shape: {args.tokens} tokens x hidden {args.dim} -> vocabulary {args.vocab}; "
          f"median of {args.repeats}")
    print(f"{'method':<22}{'peak (MB)':>12}{'time (s)':>10}{'loss':>12}{'|dh|':>12}")
    med = {}
    for method, rows in results.items():
        peak = statistics.median(r["peak_delta"] for r in rows) / 2**20
        secs = statistics.median(r["seconds"] for r in rows)
        med[method] = (peak, secs)
        name = "F.cross_entropy (full)" if method == "full" else "cut cross-entropy"
        print(f"{name:<22}{peak:>12.1f}{secs:>10.2f}{rows[0]['loss']:>12.6f}"
              f"{rows[0]['grad_norm']:>12.6f}")
    print(f"memory ratio full / cce: {med['full'][0] / max(med['cce'][0], 1e-9):.1f}x; "
          f"time ratio cce / full: {med['cce'][1] / med['full'][1]:.2f}x")


if __name__ == "__main__":
    main()
