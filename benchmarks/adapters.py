"""Fine-tune adapters on SmolLM2-135M with pydoc text on CPU: LoRA (gaussian), LoRA (EVA), Bone.

Every method adapts q_proj and o_proj (both 576x576) of all 30 layers with the same
trainable-parameter budget (LoRA r=16 <-> Bone block=32: 36,864 parameters per layer), then trains for a fixed number of
steps with the same optimizer, batches and seed. Prints the loss curve summary and the final
evaluation perplexity, writes docs/bench/adapters.json and a PNG of the loss curves.

    python benchmarks/adapters.py [--steps 150] [--batch 4] [--seqlen 128] [--lr 5e-4]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

from surgery.data import corpus
from surgery.evaluate import perplexity
from surgery.models import load_model
from surgery.passapi import CallValue, RunContext
from surgery.passes.adapters import trainable_parameters
from surgery.progress import Progress
from surgery.registry import get_pass

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "o_proj")
METHODS = {
    "lora-gaussian": ("lora", {"r": 16, "alpha": 32, "init": "gaussian"}),
    "lora-eva": ("lora", {"r": 16, "alpha": 32,
                          "init": CallValue(name="eva", kwargs={"data": "train", "rho": 2,
                                                                "batch_size": 4, "max_steps": 16})}),
    "bone": ("bone", {"block": 32}),
}


def attach(model: nn.Module, method: str, params: dict, data) -> dict:
    P = get_pass("adapt", method)
    mods = {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}
    ctx = RunContext(model=model, models={}, data={"train": data}, progress=Progress(), seed=0)
    t0 = time.perf_counter()
    rep = P(P.Params(**params)).run(ctx, mods).report
    return {"init_seconds": time.perf_counter() - t0, **rep.metrics}


def run(name: str, args, data, eval_tokens) -> dict:
    method, params = METHODS[name]
    torch.manual_seed(0)
    model = load_model("zoo:smollm2-135m").model
    info = attach(model, method, params, data)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    train = data.calibration
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = train[(step * args.batch) % train.shape[0]:][: args.batch]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0
    model.eval()
    ppl = perplexity(model, eval_tokens)
    return {"method": name, "params": {k: str(v) for k, v in params.items()},
            "trainable": trainable_parameters(model), "losses": losses,
            "eval_ppl": ppl, "train_seconds": train_s, **info}


def window_mean(xs, a, b):
    part = xs[a:b]
    return sum(part) / len(part)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    lm = load_model("zoo:smollm2-135m")
    data = corpus(lm.tokenizer, "pydoc", samples=args.steps * args.batch, seqlen=args.seqlen,
                  seed=0, name="train", eval_windows=args.eval_windows)
    base_ppl = perplexity(lm.model, data.evaluation)
    del lm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.methods.split(","):
        # Each method's result is kept as it finishes, so an interrupted run resumes.
        part = out / f"adapters_{name}.json"
        key = {k: v for k, v in vars(args).items() if k not in ("methods", "out")}
        if part.exists() and json.loads(part.read_text())["args"] == key:
            results.append(json.loads(part.read_text())["result"])
            continue
        results.append(run(name, args, data, data.evaluation))
        part.write_text(json.dumps({"args": key, "result": results[-1]}))
        print(f"done: {name}: eval ppl {results[-1]['eval_ppl']:.3f}, "
              f"{results[-1]['train_seconds']:.0f} s", flush=True)

    n = args.steps
    k = max(1, n // 10)
    print(f"SmolLM2-135M, pydoc, {n} steps x batch {args.batch} x seqlen {args.seqlen}, "
          f"AdamW lr {args.lr} (warmup {max(1, n // 10)}), targets {'/'.join(TARGETS)}, "
          f"{platform.processor() or platform.machine()} 2-core CPU, no GPU")
    print(f"base model eval perplexity: {base_ppl:.3f}", flush=True)
    print("| method | trainable params | init s | loss first 10% | loss mid 10% | loss last 10% "
          "| eval ppl | train s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ls = r["losses"]
        print(f"| {r['method']} | {r['trainable']:,} | {r['init_seconds']:.1f} | "
              f"{window_mean(ls, 0, k):.3f} | {window_mean(ls, n // 2 - k // 2, n // 2 + (k + 1) // 2):.3f} | "
              f"{window_mean(ls, n - k, n):.3f} | {r['eval_ppl']:.3f} | {r['train_seconds'] / n:.2f} |")
    for thr in (3.0, 2.5, 2.0):
        reach = {r["method"]: next((i + 1 for i in range(n) if
                                    window_mean(r["losses"], max(0, i - 9), i + 1) <= thr), None)
                 for r in results}
        print(f"first step with 10-step mean loss <= {thr}: {reach}")
    (out / "adapters.json").write_text(json.dumps(
        {"args": vars(args), "base_ppl": base_ppl, "results": results}, indent=1))
    plot(results, base_ppl, out / "adapters_loss.png", args)


def plot(results, base_ppl, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in results:
        ls = r["losses"]
        smooth = [window_mean(ls, max(0, i - 9), i + 1) for i in range(len(ls))]
        line, = ax.plot(range(1, len(ls) + 1), ls, alpha=0.25)
        ax.plot(range(1, len(ls) + 1), smooth, color=line.get_color(),
                label=f"{r['method']} (eval ppl {r['eval_ppl']:.2f})")
    ax.axhline(math.log(base_ppl), color="gray", ls=":", label=f"base eval NLL (ppl {base_ppl:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (NLL)")
    ax.set_title(f"SmolLM2-135M adapters on pydoc: batch {args.batch}, seqlen {args.seqlen}, "
                 f"lr {args.lr}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
