"""Peak RSS of a streamed GPTQ with the calibration activations in memory vs spilled to disk
(passes/calib/spill.py), on a random LLaMA whose block inputs outweigh its blocks.

    OMP_NUM_THREADS=1 python benchmarks/spill.py [--samples 128] [--seqlen 256]

Each run is `surgery apply --stream on --format json` in a fresh subprocess, one at a time; the
printed table has the measured peak RSS (ru_maxrss), the plan's estimate, wall time and whether
the output weights are byte-identical between the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(d: Path, hidden: int, inter: int, layers: int) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=hidden, intermediate_size=inter,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            num_key_value_heads=hidden // 64, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def apply(script: Path, out: Path, *flags: str) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "surgery", "apply", str(script), "-o", str(out),
                        "--format", "json", "--stream", "on", *flags],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout)["streamed"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = make_checkpoint(tmp / "ckpt", args.hidden, 2 * args.hidden, args.layers)
        script = tmp / "gptq.surg"
        script.write_text(
            f'surgery 1\nmodel base = "hf:{ck}"\n'
            f'data calib = corpus("pydoc", samples={args.samples}, seqlen={args.seqlen})\n'
            'quantize type(Linear) - modules("lm_head") to int4 using gptq(data=calib, '
            'group=128, batch=8)\n')
        inputs = args.samples * args.seqlen * args.hidden * 4
        print(f"model: hidden {args.hidden}, {args.layers} layers; calibration "
              f"{args.samples} x {args.seqlen}: block inputs {inputs / 2**20:.0f} MiB (fp32)")
        rows = []
        for name, flags in (("in memory", ()),
                            ("spilled", ("--spill-activations", str(tmp / "spill")))):
            rep, wall = apply(script, tmp / name.replace(" ", "-"), *flags)
            rows.append((name, rep["peak_rss_bytes"], rep["estimate"]["host_streamed_bytes"],
                         wall))
        same = all((tmp / "in-memory" / f).read_bytes() == (tmp / "spilled" / f).read_bytes()
                   for f in os.listdir(tmp / "in-memory") if f.endswith(".safetensors"))
        print("| activations | peak RSS | estimate | wall |")
        print("|---|---|---|---|")
        for name, peak, est, wall in rows:
            print(f"| {name} | {peak / 2**20:.0f} MiB | {est / 2**20:.0f} MiB | {wall:.1f} s |")
        print(f"weights byte-identical: {same}")


if __name__ == "__main__":
    main()
