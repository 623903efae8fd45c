"""Attention-surgery benchmarks: the two headline claims of the papers behind the swap passes.

1. grokking  (Prieto et al., "Grokking at the Edge of Numerical Stability"): modular addition,
   MLP, no weight decay, float32. Softmax cross-entropy vs StableMax cross-entropy vs softmax
   cross-entropy with perpGrad; test accuracy over steps and the Softmax-Collapse fraction (train
   samples whose float32 softmax gradient is exactly zero). Set up as the reference code
   (run_main_experiments.sh, models.py): one-hot(a) ++ one-hot(b) inputs, MLP 2p-200-200-p
   *without biases*, full batch, AdamW lr 0.01, eps 1e-25, beta2 0.999 for StableMax and 0.99
   otherwise, train fraction 0.4; StableMax CE computed in float64 as the reference does.
2. length    (Gao & Spratling, "Softplus Attention with Re-weighting ..."): the same tiny causal
   LLaMA (byte-level, RoPE) trained on pydoc text at context 128 with softmax, LSSA and LSSAR
   attention (the latter two made by the `swap` passes); held-out loss at 128 ... 2048 tokens.

Usage: python benchmarks/attention.py [grokking|length|all] [--out DIR] [--quick] [--threads 1]
       grokking options: --modulus --grok-steps --grok-losses --grok-lr --train-fraction --stop-acc --tag
Prints markdown tables, writes <out>/attention_<exp>.json and PNG plots.
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
import torch.nn.functional as F

from surgery.passes.attention.functional import stablemax
from surgery.passes.attention.training import OrthoGrad, stablemax_cross_entropy


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads), no GPU"


# -- 1. grokking at the edge of numerical stability ------------------------------------------------

def modular_addition(p: int, train_fraction: float, seed: int, device):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(train_fraction * p * p)
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def grokking_run(loss_name: str, steps: int, p: int, device, seed: int = 0, eval_every: int = 100,
                 lr: float = 0.01, train_fraction: float = 0.4, stop_acc: float | None = None,
                 progress: bool = False, bias: bool = False, beta2: float | None = None,
                 checkpoint: Path | None = None) -> dict:
    xtr, ytr, xte, yte = modular_addition(p, train_fraction, seed, device)
    torch.manual_seed(seed)
    # The reference MLP for modular arithmetic has no biases (models.MLP(..., bias=False)): a
    # homogeneous network, whose logits grow with the weight norm (the paper's NLM direction).
    model = nn.Sequential(nn.Linear(2 * p, 200, bias=bias), nn.ReLU(), nn.Linear(200, 200, bias=bias), nn.ReLU(),
                          nn.Linear(200, p, bias=bias)).to(device)
    beta2 = beta2 if beta2 is not None else REFERENCE_BETA2[loss_name]
    kw = dict(lr=lr, betas=(0.9, beta2), eps=1e-25, weight_decay=0.0)
    if loss_name == "softmax+perpgrad":
        opt = OrthoGrad(model.parameters(), torch.optim.AdamW, **kw)
    else:
        opt = torch.optim.AdamW(model.parameters(), **kw)
    hist = {"step": [], "test_acc": [], "train_acc": [], "collapse": []}
    start, elapsed, t0 = 0, 0.0, time.time()
    if checkpoint is not None and checkpoint.exists():  # resume an interrupted run
        ck = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        hist, start, elapsed = ck["hist"], ck["step"], ck["seconds"]
        hist = {k: v[:-1] for k, v in hist.items()}  # the checkpoint step is evaluated again below
        if progress:
            print(f"  [{loss_name}] resumed at step {start} from {checkpoint}", flush=True)
    for step in range(start, steps + 1):
        logits = model(xtr)
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                hist["step"].append(step)
                hist["train_acc"].append(float((logits.argmax(-1) == ytr).float().mean()))
                hist["test_acc"].append(float((model(xte).argmax(-1) == yte).float().mean()))
                # Collapse: the correct class's fp32 probability under the run's own normaliser
                # rounds to exactly 1, so that sample's loss gradient is exactly zero.
                norm = stablemax if loss_name == "stablemax" else torch.softmax
                prob = norm(logits.float(), -1).gather(1, ytr[:, None]).squeeze(1)
                hist["collapse"].append(float((prob == 1.0).float().mean()))
                if progress:
                    print(f"  [{loss_name}] step {step}: train {hist['train_acc'][-1]:.3f} test "
                          f"{hist['test_acc'][-1]:.3f} collapse {hist['collapse'][-1]:.1%}", flush=True)
                if checkpoint is not None:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hist": hist,
                                "step": step, "seconds": elapsed + time.time() - t0}, checkpoint)
                if stop_acc is not None and hist["test_acc"][-1] >= stop_acc:
                    break  # generalised: the rest of the budget adds nothing to the comparison
        if step == steps:
            break
        if loss_name == "stablemax":
            loss = stablemax_cross_entropy(logits, ytr)  # float64 inside, as the reference
        else:
            loss = F.cross_entropy(logits, ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    first = next((s for s, a in zip(hist["step"], hist["test_acc"]) if a >= 0.95), None)
    return {"loss": loss_name, "final_test_acc": hist["test_acc"][-1], "best_test_acc": max(hist["test_acc"]),
            "final_train_acc": hist["train_acc"][-1], "step_test_95": first,
            "final_collapse": hist["collapse"][-1], "max_collapse": max(hist["collapse"]),
            "steps_run": hist["step"][-1], "seconds": round(elapsed + time.time() - t0, 1), "history": hist}


GROK_LOSSES = ("softmax", "stablemax", "softmax+perpgrad")
# Adam beta2 of the reference runs (run_main_experiments.sh): StableMax 0.999, perpGrad and the
# float32 softmax (Softmax Collapse) runs use the reference default 0.99.
REFERENCE_BETA2 = {"softmax": 0.99, "stablemax": 0.999, "softmax+perpgrad": 0.99}


def _per_loss(spec: str | int | None, default: int) -> dict[str, int]:
    """'20000' or 'softmax=8000,stablemax=20000' -> steps per loss."""
    if spec is None:
        return {k: default for k in GROK_LOSSES}
    spec = str(spec)
    if "=" not in spec:
        return {k: int(spec) for k in GROK_LOSSES}
    out = {k: default for k in GROK_LOSSES}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k not in GROK_LOSSES:
            raise ValueError(f"unknown loss {k!r} in --grok-steps (choose from {GROK_LOSSES})")
        out[k] = int(v)
    return out


def grokking(out: Path, quick: bool, modulus: int | None = None, steps: str | int | None = None,
             losses: tuple[str, ...] = GROK_LOSSES, lr: float = 0.01, train_fraction: float = 0.4,
             stop_acc: float | None = None, eval_every: int | None = None, tag: str = "",
             bias: bool = False, checkpoint_dir: Path | None = None,
             seeds: tuple[int, ...] = (0,)) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = modulus or (23 if quick else 113)
    per_loss = _per_loss(steps, 300 if quick else 30000)
    steps = max(per_loss[k] for k in losses)
    runs = []
    result = {"experiment": "grokking", "modulus": p, "steps": steps, "steps_per_loss": per_loss,
              "train_fraction": train_fraction, "stop_acc": stop_acc,
              "model": f"MLP 2p-200-200-p {'with' if bias else 'without'} biases (one-hot a ++ one-hot b), "
                       f"AdamW lr {lr} betas (0.9, beta2) beta2 {REFERENCE_BETA2}, eps 1e-25, "
                       "no weight decay, full batch, float32 (StableMax CE: float64 inside)",
              "device": device_name(), "runs": runs}
    for seed in seeds:
        for name in losses:
            n = per_loss[name]
            ck = None
            if checkpoint_dir is not None:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                ck = checkpoint_dir / (f"grok_{name}_p{p}_tf{train_fraction}_lr{lr}_bias{int(bias)}"
                                       f"{f'_seed{seed}' if seed else ''}.pt")
            r = grokking_run(name, n, p, device, seed=seed, eval_every=eval_every or max(10, n // 200),
                             lr=lr, train_fraction=train_fraction, stop_acc=stop_acc, progress=True,
                             bias=bias, checkpoint=ck)
            runs.append({"seed": seed, **r})
            # partial results survive an interrupted long run
            (out / f"attention_grokking{tag}.json").write_text(json.dumps(result, indent=1))
    print(f"\n### Grokking: modular addition mod {p}, train fraction {train_fraction}, lr {lr}, "
          f"up to {steps} full-batch steps ({device_name()})\n")
    print("| loss | seed | steps run | final test acc | best test acc | first step test >= 95% | final train acc | "
          "Softmax Collapse (train, final / max) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['loss']} | {r.get('seed', 0)} | {r['steps_run']} | {r['final_test_acc']:.3f} | {r['best_test_acc']:.3f} | "
              f"{r['step_test_95']} | {r['final_train_acc']:.3f} | {r['final_collapse']:.1%} / "
              f"{r['max_collapse']:.1%} | {r['seconds']} |")
    _plot_grokking(result, out / f"attention_grokking{tag}.png")
    return result


def merge_grokking(paths: list[str], out: Path, tag: str) -> dict:
    """One table and plot from several grokking result files (runs on different machines or
    resumed from checkpoints); each run keeps the device it ran on."""
    merged: dict | None = None
    for path in paths:
        part = json.loads(Path(path).read_text())
        for run in part["runs"]:
            run.setdefault("device", part["device"])
        if merged is None:
            merged = {**part, "device": "per run", "runs": []}
        merged["runs"] += part["runs"]
    assert merged is not None
    print("| loss | seed | device | steps run | final test acc | best test acc | "
          "first step test >= 95% | Softmax Collapse (train, final / max) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in merged["runs"]:
        print(f"| {r['loss']} | {r.get('seed', 0)} | {r['device']} | {r['steps_run']} | "
              f"{r['final_test_acc']:.3f} | {r['best_test_acc']:.3f} | {r['step_test_95']} | "
              f"{r['final_collapse']:.1%} / {r['max_collapse']:.1%} | {r['seconds']} |")
    (out / f"attention_grokking{tag}.json").write_text(json.dumps(merged, indent=1))
    _plot_grokking(merged, out / f"attention_grokking{tag}.png")
    return merged


def _plot_grokking(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"]:
        h = r["history"]
        name = r["loss"] + (f" seed {r['seed']}" if len({x.get("seed", 0) for x in result["runs"]}) > 1 else "")
        if result.get("device") == "per run":
            name += f" ({r['device'].split(' (')[0]})"
        line, = ax.plot(h["step"], h["test_acc"], label=f"{name} (test)")
        ax.plot(h["step"], h["train_acc"], ls=":", color=line.get_color(), label=f"{name} (train)")
        ax2.plot(h["step"], h["collapse"], color=line.get_color(), label=name)
    ax.set(xlabel="step", ylabel="accuracy",
           title=f"mod {result['modulus']}, train frac {result['train_fraction']}, float32, no WD")
    ax2.set(xlabel="step", ylabel="fraction of train samples", title="Softmax Collapse (fp32 prob == 1)")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 2. length extrapolation ----------------------------------------------------------------------

def byte_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from surgery.data import pydoc_text

    data = torch.tensor(list(pydoc_text().encode("utf-8")), dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def tiny_llama(attn: str, small: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.passapi import RunContext
    from surgery.progress import Progress
    from surgery.registry import get_pass

    width, layers, heads = (128, 2, 2) if small else (256, 4, 4)  # head dim 64 as in the paper
    cfg = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=4096,
                      rope_theta=10000.0, tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if attn != "softmax":
        P = get_pass("swap", "softplus")
        params = P.Params(reweight=True, p=15) if attn == "lssar" else P.Params()
        targets = {n: m for n, m in model.named_modules() if n.endswith("self_attn")}
        P(params).run(RunContext(model=model, models={}, data={}, progress=Progress()), targets)
    return model


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def length_run(attn: str, steps: int, batch: int, ctx: int, lengths: list[int], device) -> dict:
    train, test = byte_corpus()
    model = tiny_llama(attn, small=device == "cpu").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - ctx - 1, (batch,), generator=gen)
        ids = torch.stack([train[s:s + ctx + 1] for s in starts]).to(device)
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    train_s = time.time() - t0
    model.eval()
    # the same held-out text at every length (at most 16 windows of the longest length)
    span = min(len(test) // (max(lengths) + 1), 16) * (max(lengths) + 1)
    evals = {}
    with torch.no_grad():
        for length in lengths:
            windows = test[:span][: (span // (length + 1)) * (length + 1)].view(-1, length + 1)
            total, count = 0.0, 0
            for i in range(0, len(windows), 8):
                ids = windows[i:i + 8].to(device)
                total += float(lm_loss(model, ids)) * ids[:, 1:].numel()
                count += ids[:, 1:].numel()
            evals[length] = total / count
    return {"attention": attn, "final_train_loss": float(loss), "eval_loss": evals, "train_seconds": round(train_s, 1)}


def length(out: Path, quick: bool, steps: int | None = None, batch: int | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere: compare normalisers, not precisions
    steps = steps or (20 if quick else 3000)
    batch = batch or (8 if quick else 64)
    lengths = [128, 256, 512] if quick else [128, 256, 512, 1024, 2048]
    runs = [length_run(a, steps, batch, 128, lengths, device) for a in ("softmax", "lssa", "lssar")]
    size = "hidden 128, 2 layers, 2 heads (1 kv)" if device == "cpu" else "hidden 256, 4 layers, 4 heads (2 kv)"
    result = {"experiment": "length", "train_context": 128, "steps": steps, "batch": batch,
              "model": f"LlamaForCausalLM on bytes (vocab 256), {size}, head dim 64, RoPE 10000; "
                       "AdamW lr 1e-3 cosine; pydoc text, last 10% held out",
              "device": device_name(), "runs": runs}
    print(f"\n### Length extrapolation: trained at 128 tokens, {steps} steps x {batch} ({device_name()})\n")
    print("| attention | train loss | " + " | ".join(f"loss @{n}" for n in lengths) + " | train time (s) |")
    print("|---|---|" + "---|" * len(lengths) + "---|")
    for r in runs:
        print(f"| {r['attention']} | {r['final_train_loss']:.3f} | "
              + " | ".join(f"{r['eval_loss'][n]:.3f}" for n in lengths) + f" | {r['train_seconds']} |")
    _plot_length(result, lengths, out / "attention_length.png")
    return result


def _plot_length(result: dict, lengths: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["runs"]:
        ax.plot(lengths, [r["eval_loss"][n] for n in lengths], marker="o", label=r["attention"])
    ax.axvline(result["train_context"], color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation length (tokens)", ylabel="held-out loss (nats/byte)",
           title="tiny LLaMA trained at 128 tokens on pydoc")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", nargs="?", default="all", choices=["grokking", "length", "all"])
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--modulus", type=int, help="grokking: modulus (default 113)")
    ap.add_argument("--grok-steps", help="grokking: full-batch steps (default 30000), or per loss: "
                                         "softmax=8000,stablemax=20000")
    ap.add_argument("--grok-losses", default=",".join(GROK_LOSSES),
                    help="grokking: comma-separated subset/order of " + ",".join(GROK_LOSSES))
    ap.add_argument("--grok-lr", type=float, default=0.01, help="grokking: AdamW learning rate")
    ap.add_argument("--train-fraction", type=float, default=0.4, help="grokking: train split of the p^2 pairs")
    ap.add_argument("--stop-acc", type=float, help="grokking: stop a run once test accuracy reaches this")
    ap.add_argument("--grok-eval-every", type=int, help="grokking: evaluation interval (default steps/200)")
    ap.add_argument("--mlp-bias", action="store_true",
                    help="grokking: MLP with biases (the reference has none)")
    ap.add_argument("--checkpoint-dir", help="grokking: save each run at every evaluation and resume "
                                             "from there when run again (long runs on a shared machine)")
    ap.add_argument("--seeds", default="0", help="grokking: comma-separated seeds (data split and init)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="grokking: merge these result files into one table and plot, run nothing")
    ap.add_argument("--tag", default="", help="suffix for the output files (variations)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (use 1 on a shared machine)")
    ap.add_argument("--lm-steps", type=int, help="length: training steps (default 3000)")
    ap.add_argument("--lm-batch", type=int, help="length: batch size (default 64)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge_grokking(args.merge, out, args.tag)
        return
    torch.manual_seed(0)
    losses = tuple(x for x in args.grok_losses.split(",") if x)
    unknown = set(losses) - set(GROK_LOSSES)
    if unknown:
        ap.error(f"unknown --grok-losses {sorted(unknown)}; choose from {GROK_LOSSES}")
    runs = (("grokking", lambda: grokking(out, args.quick, args.modulus, args.grok_steps, losses, args.grok_lr,
                                          args.train_fraction, args.stop_acc, args.grok_eval_every, args.tag,
                                          args.mlp_bias,
                                          Path(args.checkpoint_dir) if args.checkpoint_dir else None,
                                          tuple(int(x) for x in args.seeds.split(",")))),
            ("length", lambda: length(out, args.quick, args.lm_steps, args.lm_batch)))
    for name, fn in runs:
        if args.experiment in (name, "all"):
            result = fn()
            (out / f"attention_{name}{args.tag if name == 'grokking' else ''}.json").write_text(
                json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
