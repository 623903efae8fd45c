"""How long `surgery plan` takes on SmolLM2-135M built from config.json alone (no weights).

Runs the CLI cold in a fresh process several times and prints a table (wall time, and the
resident memory of the process, which stays far below the 540 MB of fp32 weights).

    python benchmarks/plan_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = '''model base = "zoo:smollm2-135m"
data calib = corpus("pydoc", samples=64, seqlen=256)
let body = type(Linear) - modules("lm_head")
prune modules("model.layers.*.mlp.*_proj") to 2:4 using sparsegpt(data=calib)
quantize body to int4 using gptq(group=64, data=calib)
'''


def timed(cmd: list[str], runs: int) -> tuple[list[float], float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "plan.surg"
        f.write_text(SCRIPT)
        rows = [
            ("`surgery plan` SmolLM2-135M, 2 statements, 300 module matches (structural "
             "skeleton from the shipped description)",
             timed([sys.executable, "-m", "surgery.cli", "plan", str(f), "--format", "json"],
                   args.runs)),
            ("for comparison: building the real skeleton from transformers' code, nothing else",
             timed([sys.executable, "-c", "from surgery.models import load_skeleton; "
                    "load_skeleton('zoo:smollm2-135m', structural=False)"], args.runs)),
        ]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print("| what | median s | min s | max s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for what, (times, rss) in rows:
        print(f"| {what} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} "
              f"| {rss:.0f} |")


if __name__ == "__main__":
    main()
