"""Streamed `surgery apply` on big random LLaMA checkpoints: peak RSS, wall time, time per block
and the plan's estimate (docs/scale.md, docs/bench/scale.md).

    python benchmarks/executor_scale.py CKPT_DIR rtn|gptq4|merge [--out DIR] [--device cuda]
                                        [--expect WINDOWS]

``--expect N`` gates the run on `expect perplexity` and `expect cosine` over N evaluation windows
of ``--seqlen`` tokens (evaluated block by block, surgery/executor/evaluate.py).

The checkpoints are the cached ones `benchmarks/scale.py` writes (random-initialised, bf16,
sharded). Each measurement is one fresh `surgery apply --stream on --format json` process, so the
peak RSS is that process's own (ru_maxrss), startup included. Run single-threaded on a shared
machine (OMP_NUM_THREADS=1) and name the load (uptime) with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = {
    "rtn": 'quantize type(Linear) - modules("lm_head") to int8',
    "gptq4": ('data calib = corpus("pydoc", samples={samples}, seqlen={seqlen})\n'
              'quantize {blocks} to int4 using gptq(data=calib, group=128)'),
    "merge": "merge base, other using linear()",
}


EXPECT = ('data evalset = corpus("pydoc", samples=1, seqlen={seqlen}, eval_windows={windows})\n'
          "expect perplexity(evalset) <= 1.5 * original\nexpect cosine(evalset) >= 0.9\n")


def script(ckpt: Path, kind: str, out: Path, blocks: int | None, samples: int, seqlen: int,
           expect: int = 0) -> str:
    sel = ('type(Linear) - modules("lm_head")' if blocks is None else
           " | ".join(f'modules("model.layers.{i}.*")' for i in range(blocks)))
    head = f'surgery 1\nmodel base = "hf:{ckpt}"\n'
    if kind == "merge":
        head += f'model other = "hf:{ckpt}"\n'
    body = SCRIPTS[kind].format(blocks=sel, samples=samples, seqlen=seqlen)
    if expect:
        body += "\n" + EXPECT.format(seqlen=seqlen, windows=expect)
    return head + body + f'\nsave "{out}"\n'


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("kind", choices=sorted(SCRIPTS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=None, help="GPTQ: only the first N blocks")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the output directory")
    ap.add_argument("--expect", type=int, default=0, metavar="WINDOWS",
                    help="gate on perplexity and cosine over WINDOWS evaluation windows")
    a = ap.parse_args()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=a.out.parent if a.out else None))
    out = a.out or work / "out"
    s = work / "s.surg"
    s.write_text(script(a.ckpt.resolve(), a.kind, out, a.blocks, a.samples, a.seqlen,
                        a.expect))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "apply", str(s), "--stream", "on",
                           "--format", "json", "--device", a.device], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    rep = json.loads(proc.stdout)
    st = rep["streamed"]
    blocks = st.get("block_seconds", [])
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    res = {"checkpoint": a.ckpt.name, "kind": a.kind, "device": a.device,
           "peak_rss_gib": round(st["peak_rss_bytes"] / 2**30, 3),
           "estimate_gib": round(st["estimate"]["host_streamed_bytes"] / 2**30, 3),
           "estimate_error_pct": round(100 * (st["estimate"]["host_streamed_bytes"]
                                              / st["peak_rss_bytes"] - 1), 1),
           "wall_s": round(wall, 1), "run_s": round(st["seconds"], 1),
           "cpu_s": round(st.get("cpu_seconds", 0.0), 1),
           "blocks": st["blocks"], "mean_block_s": round(sum(blocks) / len(blocks), 2)
           if blocks else None, "output_gb": round(size / 1e9, 3)}
    if rep.get("expectations"):
        res["expectations"] = [{k: e[k] for k in ("statement", "value", "original", "passed")}
                               for e in rep["expectations"]]
    if "peak_device_bytes" in st:
        res["peak_device_gib"] = round(st["peak_device_bytes"] / 2**30, 3)
    print(json.dumps(res))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
