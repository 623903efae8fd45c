"""GPTQ int4 g128 side by side: surgery against llm-compressor's sequential pipeline (issue 19).

    python benchmarks/scale_peer.py --size llama-1b [--blocks N] [--threads 1]

Both run on the same cached checkpoint (scale_ckpt.py), in fresh subprocesses, one after the
other, with the same calibration tokens (surgery's `corpus("pydoc", samples=16, seqlen=512)`
windows, handed to llm-compressor as a dataset of input_ids), the same threads and the same GPTQ
settings (llm-compressor's W4A16 scheme: symmetric int4, group 128, static activation order,
damp 0.01, blocks of 128 columns; surgery: `gptq(group=128, symmetric=true, act_order=true,
static_groups=true)`). Both load the model, calibrate, quantize the decoder projections and
save. Measured: peak RSS (wait4 ru_maxrss) and wall time. llm-compressor is installed only in the
benchmark's venv (`pip install llmcompressor --no-deps` plus `datasets`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from scale import measure, run_one  # noqa: E402
from scale_ckpt import SIZES, write_checkpoint  # noqa: E402


def calibration_ids(ckpt: Path, samples: int, seqlen: int):
    from surgery.data import corpus
    from surgery.models import load_tokenizer

    return corpus(load_tokenizer(ckpt), "pydoc", samples=samples, seqlen=seqlen).calibration


def peer_worker(ckpt: Path, out: Path, samples: int, seqlen: int, blocks: int | None) -> None:
    """llm-compressor's oneshot GPTQ with the sequential pipeline (runs in the subprocess)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = calibration_ids(ckpt, samples, seqlen)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    targets = "Linear" if blocks is None else [
        f"re:model\\.layers\\.{i}\\..*_proj$" for i in range(blocks)]
    recipe = GPTQModifier(targets=targets, scheme="W4A16", ignore=["lm_head"],
                          dampening_frac=0.01, block_size=128)
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=samples,
            max_seq_length=seqlen, pipeline="sequential", output_dir=str(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="llama-1b", choices=list(SIZES))
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stream", default="on", choices=["on", "off", "auto"])
    ap.add_argument("--only", choices=["surgery", "llmcompressor"], default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # OUT dir: run the peer
    args = ap.parse_args(argv)
    ckpt = write_checkpoint(args.size)
    if args.worker:
        peer_worker(ckpt, Path(args.worker), args.samples, args.seqlen, args.blocks)
        return
    rows = []
    if args.only in (None, "surgery"):
        ns = argparse.Namespace(blocks=args.blocks, samples=args.samples, seqlen=args.seqlen,
                                threads=args.threads, nproc=None, workdir=None, extra=[],
                                stream=args.stream)
        rows.append({"tool": "surgery", **run_one(args.size, "gptq4", ns)})
        print(json.dumps(rows[-1]), flush=True)
    if args.only in (None, "llmcompressor"):
        work = Path(tempfile.mkdtemp(prefix="scale-peer-"))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "--size", args.size, "--samples", str(args.samples),
               "--seqlen", str(args.seqlen), "--worker", str(work / "out")]
        if args.blocks is not None:
            cmd += ["--blocks", str(args.blocks)]
        try:
            m = measure(cmd, env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = {"tool": "llmcompressor", "size": args.size, "run": "gptq4",
               "blocks": args.blocks or SIZES[args.size].layers, "threads": args.threads,
               "rc": m["rc"], "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
               "peak_rss_gb": m["peak_rss_gb"],
               "peak_tree_rss_gb": m["peak_tree_rss_gb"]}
        if m["rc"] != 0:
            row["error"] = m["stderr"][-3000:]
        else:  # evidence that it did quantize: its per-layer log lines
            logs = (m["stdout"] + m["stderr"]).splitlines()
            row["layers_logged"] = sum(1 for ln in logs if "Quantizing" in ln)
            row["log_tail"] = "\n".join(logs[-6:])[-1500:]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
