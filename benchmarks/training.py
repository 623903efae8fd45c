"""Loss-plus-backward peak memory and time of Cut Cross-Entropy against F.cross_entropy on full
logits, at SmolLM2's head shape (hidden 576, vocabulary 49,152), side by side in one run.

Each measurement runs in a fresh subprocess so peak RSS (CPU) is its own: the figure is the peak
resident set size during loss + backward minus the resident size just before, with the inputs
(hidden states, head weight, labels) already allocated. On a GPU (--device cuda) it is
torch.cuda.max_memory_allocated over the same span. Methods alternate, medians are reported.

    python benchmarks/training.py                      # batch 8 x 2048 on CPU
    python benchmarks/training.py --tokens 4096 --repeats 3
    python benchmarks/training.py --device cuda
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
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
