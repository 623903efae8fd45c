"""Scale benchmark (issue 19): surgery on random LLaMA checkpoints from 0.25B to Llama-3-8B dims.

    python benchmarks/scale.py --sizes llama-0.25b --runs rtn8,gptq4,sparsegpt24,merge
    python benchmarks/scale.py --sizes llama-8b --runs gptq4 --blocks 4      # first 4 blocks
    python benchmarks/scale.py --sizes llama-1b --runs gptq4 --nproc 2       # 2 ranks (gloo)

Checkpoints are written once by scale_ckpt.py (bf16, sharded, cached under
$SURGERY_CACHE/scale). Every run is `surgery apply` in a fresh subprocess (one at a time), with
OMP_NUM_THREADS=--threads. Reported per run: peak RSS of the largest process (wait4's
ru_maxrss, which covers torchrun's ranks too), peak RSS summed over the process tree (sampled
every 0.2 s), wall time, the step's time per selected block, the plan's memory estimate when
`surgery plan --format json` provides one, and peak device memory (GPU runs only; the CLI has to
report it). `--json FILE` appends one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from scale_ckpt import SIZES, write_checkpoint  # noqa: E402

CALIB = 'data calib = corpus("pydoc", samples={samples}, seqlen={seqlen})\n'
RUNS = {
    "rtn8": "quantize {sel} to int8\n",
    # llm-compressor's W4A16 defaults: symmetric int4, group 128, static activation order
    "gptq4": "quantize {sel} to int4 using gptq(data=calib, group=128, symmetric=true, "
             "act_order=true, static_groups=true)\n",
    "sparsegpt24": "prune {sel} to 2:4 using sparsegpt(data=calib)\n",
    # two calibrated steps in one streamed sweep (executor/multistep.py): sparse + quantized
    "sparsegpt24+gptq4": "prune {sel} to 2:4 using sparsegpt(data=calib)\n"
                         "quantize {sel} to int4 using gptq(data=calib, group=128, "
                         "symmetric=true, act_order=true, static_groups=true)\n",
    "merge": "merge a, b using linear()\n",
}
CALIBRATED = {"gptq4", "sparsegpt24", "sparsegpt24+gptq4"}


def selector(blocks: int | None) -> str:
    if blocks is None:
        return 'modules("model.layers.*.*.*_proj")'
    return "modules(" + ", ".join(f'"model.layers.{i}.*.*_proj"' for i in range(blocks)) + ")"


def second_copy(ckpt: Path) -> Path:
    """A second model directory for the merge: symlinks to the same files (no disk used)."""
    copy = ckpt.with_name(ckpt.name + "-copy")
    if not copy.exists():
        copy.mkdir()
        for f in ckpt.iterdir():
            (copy / f.name).symlink_to(f)
    return copy


def script(run: str, ckpt: Path, blocks: int | None, samples: int, seqlen: int) -> str:
    head = "surgery 1\n"
    if run == "merge":
        return (head + f'model base = "hf:{ckpt}"\nmodel a = "hf:{ckpt}"\n'
                f'model b = "hf:{second_copy(ckpt)}"\n' + RUNS[run])
    head += f'model base = "hf:{ckpt}"\n'
    if run in CALIBRATED:
        head += CALIB.format(samples=samples, seqlen=seqlen)
    return head + RUNS[run].format(sel=selector(blocks))


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall time, exit code, peak RSS (largest process; and whole tree, sampled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s, b: b.append(s.read()), args=(s, b), daemon=True)
               for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(wall, 2),
            # CPU seconds of the process tree: on a shared machine, the fairer time to compare
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
            "peak_tree_rss_gb": round(peak[0] / 1e9, 3),
            "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)}


def plan_estimate(surg: Path, env: dict) -> dict | None:
    """The memory estimate of `surgery plan --format json` (its "memory" object), in GB."""
    p = subprocess.run([sys.executable, "-m", "surgery", "plan", str(surg), "--format", "json"],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return None
    mem = json.loads(p.stdout).get("memory")
    if not mem:
        return None
    return {k.removesuffix("_bytes") + "_gb": round(v / 1e9, 3) for k, v in mem.items()
            if k.endswith("_bytes")}


def run_one(size: str, run: str, args) -> dict:
    ckpt = write_checkpoint(size, log=lambda m: print(m, file=sys.stderr))
    dims = SIZES[size]
    blocks = None if run == "merge" else args.blocks
    n_blocks = dims.layers if blocks is None else min(blocks, dims.layers)
    work = Path(tempfile.mkdtemp(prefix=f"scale-{size}-{run}-", dir=args.workdir))
    try:
        surg = work / "run.surg"
        surg.write_text(script(run, ckpt, blocks, args.samples, args.seqlen))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "surgery", "apply", str(surg), "-o", str(work / "out"),
               "--format", "json", "--stream", args.stream, *args.extra]
        if args.nproc:
            cmd += ["--nproc", str(args.nproc)]
        est = plan_estimate(surg, env)
        m = measure(cmd, env)
        row = {"size": size, "params_b": round(dims.params() / 1e9, 3), "run": run,
               "stream": args.stream,
               "blocks": n_blocks, "nproc": args.nproc or 1, "threads": args.threads,
               "rc": m["rc"], "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
               "peak_rss_gb": m["peak_rss_gb"], "peak_tree_rss_gb": m["peak_tree_rss_gb"],
               "plan_estimate": est,
               "checkpoint_gb": round(sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
                                      / 1e9, 3)}
        if m["rc"] == 0:
            rep = json.loads(m["stdout"][m["stdout"].index("{"):])
            # every step but the save (two for sparsegpt24+gptq4: they share one sweep)
            seconds = sum(s["seconds"] for s in rep["steps"] if s.get("verb") != "save")
            row["step_s"] = round(seconds, 2)
            row["s_per_block"] = round(seconds / n_blocks, 2)
            if blocks is not None and blocks < dims.layers:
                row["extrapolated_step_s"] = round(seconds / n_blocks * dims.layers, 1)
            streamed = rep.get("streamed") or {}
            if "peak_device_bytes" in streamed:
                row["peak_device_gb"] = round(streamed["peak_device_bytes"] / 1e9, 3)
            row["streamed"] = bool(streamed)
            out = work / "out"
            row["output_gb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                                     / 1e9, 3)
        else:
            row["error"] = (m["stdout"] + m["stderr"])[-2000:]
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)  # outputs are big: never keep them


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="llama-0.25b",
                    help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--blocks", type=int, default=None,
                    help="only the first N decoder blocks (calibrated and RTN runs)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nproc", type=int, default=None, help="ranks for distributed calibration")
    ap.add_argument("--stream", default="on", choices=["on", "off", "auto"],
                    help="surgery apply --stream (on: the out-of-core executor)")
    ap.add_argument("--workdir", default=None, help="where outputs go while a run lasts")
    ap.add_argument("--json", default=None, help="append one JSON object per run here")
    ap.add_argument("extra", nargs="*", help="more `surgery apply` options (after --)")
    args = ap.parse_args(argv)
    for size in args.sizes.split(","):
        for run in args.runs.split(","):
            row = run_one(size, run, args)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
