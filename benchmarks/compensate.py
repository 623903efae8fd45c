"""EoRA vs SVD compensation on SmolLM2-135M: perplexity recovered after int3 GPTQ and 2:4 SparseGPT,
and EoRA-initialised vs zero-initialised LoRA fine-tuning on the compressed model.

    python benchmarks/compensate.py [--configs gptq3,sparsegpt24] [--rank 32] [--finetune-steps 20]

Protocol (the quantize/prune benchmarks'): targets are the 210 decoder Linear layers; calibration
random pydoc windows from the calibration part (seed 0, the same for compression and
compensation); perplexity on the pydoc evaluation split at seqlen 512, disjoint from calibration.
"Recovered" is the share of the log-perplexity gap closed:
(log ppl_compressed - log ppl_compensated) / (log ppl_compressed - log ppl_fp32).
Each finished row is appended to ``--out`` (JSON lines) as it completes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time

import torch
import torch.nn as nn

from surgery.data import corpus
from surgery.evaluate import perplexity
from surgery.models import load_model
from surgery.passapi import NM, RunContext
from surgery.passes.compensate.passes import REFERENCE
from surgery.progress import Progress
from surgery.registry import get_pass

CONFIGS = {
    "gptq3": ("int3 GPTQ g64", "quantize", "gptq", {"format": "int3", "group": 64,
                                                     "data": "calib"}),
    "gptq3_act": ("int3 GPTQ g64 act_order", "quantize", "gptq",
                  {"format": "int3", "group": 64, "data": "calib", "act_order": True,
                   "static_groups": True}),
    "sparsegpt24": ("2:4 SparseGPT", "prune", "sparsegpt",
                    {"sparsity": NM(n=2, m=4), "data": "calib"}),
}


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    from surgery.passes.quantize.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear)) and n.startswith("model.layers.")}


def run_pass(model, verb, method, params, calib, extras=None):
    P = get_pass(verb, method)
    ctx = RunContext(model=model, models={}, data={"calib": calib}, progress=Progress(),
                     extras=extras or {})
    t0 = time.perf_counter()
    rep = P(P.Params(**params)).run(ctx, decoder_linears(model)).report
    return time.perf_counter() - t0, rep


def emit(row, out):
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def finetune(model, data, steps, batch, lr):
    """Train only the low-rank paths (LoRA A/B) for ``steps`` steps; the loss of every step."""
    from surgery.passes.adapters.common import freeze_all_but_adapters

    freeze_all_but_adapters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        ids = data[(step * batch) % data.shape[0]:][:batch]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="gptq3,sparsegpt24")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--comp-samples", type=int, default=None,
                    help="calibration windows for the compensation only (default: --samples); "
                         "the compression keeps --samples, so its model is unchanged")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--finetune", default="gptq3", help="config whose model is fine-tuned")
    ap.add_argument("--finetune-steps", type=int, default=20)
    ap.add_argument("--finetune-batch", type=int, default=2)
    ap.add_argument("--finetune-seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eora-params", default="{}",
                    help='extra eora parameters as JSON, e.g. {"true_sequential": true}')
    ap.add_argument("--methods", default="svd,eora", help="compensation methods to run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--fp32-ppl", type=float, default=None,
                    help="reuse a measured fp32 perplexity (same evaluation windows)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    lm = load_model("zoo:smollm2-135m")
    base = lm.model.eval()
    calib = corpus(lm.tokenizer, "pydoc", samples=args.samples, seqlen=args.calib_seqlen, seed=0,
                   name="calib")
    comp_calib = calib if args.comp_samples is None else corpus(
        lm.tokenizer, "pydoc", samples=args.comp_samples, seqlen=args.calib_seqlen, seed=0,
        name="calib")
    evaluation = corpus(lm.tokenizer, "pydoc", samples=1, seqlen=512, seed=0,
                        eval_windows=args.eval_windows).evaluation
    train = corpus(lm.tokenizer, "pydoc", samples=args.finetune_steps * args.finetune_batch,
                   seqlen=args.finetune_seqlen, seed=1, name="train").calibration
    common = {"machine": f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU",
              "torch": torch.__version__, "threads": args.threads,
              "calib": f"{args.samples}x{args.calib_seqlen}",
              "comp_calib": f"{args.comp_samples or args.samples}x{args.calib_seqlen}",
              "eval_tokens": int(evaluation.numel()), "rank": args.rank,
              "eora_params": json.loads(args.eora_params),
              "load_at_start": round(os.getloadavg()[0], 1)}
    t0 = time.perf_counter()
    if args.fp32_ppl is None:
        fp = perplexity(base, evaluation)
        emit({"config": "fp32", "ppl": fp, "eval_s": time.perf_counter() - t0, **common},
             args.out)
    else:
        fp = args.fp32_ppl

    for key in args.configs.split(","):
        label, verb, method, params = CONFIGS[key]
        compressed = copy.deepcopy(base)
        secs, _ = run_pass(compressed, verb, method, params, calib)
        ppl_c = perplexity(compressed, evaluation)
        gap = math.log(ppl_c) - math.log(fp)
        row = {"config": label, "compress_s": secs, "ppl": ppl_c, **common}
        methods = (("svd", {"rank": args.rank}),
                   ("eora", {"rank": args.rank, "data": "calib", **json.loads(args.eora_params)}))
        for comp, kw in (m for m in methods if m[0] in args.methods.split(",")):
            model = copy.deepcopy(compressed)
            secs, rep = run_pass(model, "compensate", comp, kw, comp_calib, {REFERENCE: base})
            ppl = perplexity(model, evaluation)
            row[comp] = {"ppl": ppl, "seconds": secs,
                         "recovered": (math.log(ppl_c) - math.log(ppl)) / gap,
                         "mean_output_error_recovered":
                             rep.metrics.get("mean_output_error_recovered"),
                         "added_parameters": rep.metrics["added_parameters"]}
            if key == args.finetune and comp == "eora":
                eora_model = model
            else:
                del model
        emit(row, args.out)
        if key == args.finetune:
            # Zero-initialised LoRA (B = 0, PEFT's default A) on the same compressed model, same
            # rank and targets, versus the EoRA path trained from its computed initial value.
            zero = copy.deepcopy(compressed)
            run_pass(zero, "adapt", "lora", {"r": args.rank, "alpha": args.rank}, calib)
            curves = {}
            for name, model in (("eora-init", eora_model), ("zero-init", zero)):
                torch.manual_seed(0)
                t1 = time.perf_counter()
                losses = finetune(model, train, args.finetune_steps, args.finetune_batch,
                                  args.lr)
                curves[name] = {"losses": losses, "seconds": time.perf_counter() - t1,
                                "ppl_after": perplexity(model, evaluation)}
            emit({"config": f"{label} + rank-{args.rank} LoRA fine-tune",
                  "steps": args.finetune_steps, "batch": args.finetune_batch,
                  "seqlen": args.finetune_seqlen, "lr": args.lr, **curves, **common}, args.out)
            del eora_model, zero
        del compressed


if __name__ == "__main__":
    main()
