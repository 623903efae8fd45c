"""Perplexity of SmolLM2-135M pruned with each method (issue: prune benchmark).

Prunes every Linear inside the decoder blocks (`model.layers.*`; embeddings and the tied lm_head
stay dense), calibrates on `pydoc` samples, evaluates on the disjoint pydoc evaluation split
(seqlen 512). Each result is appended to a JSON-lines file as soon as it exists, so a partial run
still reports; `--table FILE` prints the markdown table from such a file.

    python benchmarks/prune.py --out /tmp/prune.jsonl
    python benchmarks/prune.py --table /tmp/prune.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import torch.nn as nn

CONFIGS = {  # name: (method, sparsity, extra params); ordered by what the issue checks first
    "dense": None,
    "sparsegpt 2:4": ("sparsegpt", "2:4", {}),
    "wanda 2:4": ("wanda", "2:4", {}),
    "magnitude 2:4": ("magnitude", "2:4", {}),
    "wanda 60%": ("wanda", "60%", {}),
    "wanda 60% + dsnot": ("wanda", "60%", {"refine": {}}),
    "wanda 60% + dsnot (all layers)": ("wanda", "60%", {"refine": {"skip_layer": "none"}}),
    "sparsegpt 50%": ("sparsegpt", "50%", {}),
    "wanda 50%": ("wanda", "50%", {}),
    "magnitude 50%": ("magnitude", "50%", {}),
    "sparsegpt 60%": ("sparsegpt", "60%", {}),
    "magnitude 60%": ("magnitude", "60%", {}),
}


def sparsity_value(text: str):
    from surgery.passapi import NM, Percent

    if ":" in text:
        n, m = text.split(":")
        return NM(n=int(n), m=int(m))
    return Percent(value=float(text.rstrip("%")))


def prune(model: nn.Module, method: str, sparsity: str, extra: dict, calib) -> dict:
    from surgery.passapi import RunContext
    from surgery.progress import Progress
    from surgery.registry import get_pass

    P = get_pass("prune", method)
    kw = dict(extra)
    if method != "magnitude" or "refine" in kw:
        kw["data"] = "calib"
    p = P(P.Params(sparsity=sparsity_value(sparsity), **kw))
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
    ctx = RunContext(model=model, models={}, data={"calib": calib}, progress=Progress())
    return p.run(ctx, targets).report.metrics


def run(args) -> None:
    from surgery.data import corpus
    from surgery.evaluate import perplexity
    from surgery.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lm = load_model("zoo:smollm2-135m")
    calib = corpus(lm.tokenizer, "pydoc", samples=args.samples, seqlen=args.seqlen, seed=0,
                   name="calib")
    evaluation = corpus(lm.tokenizer, "pydoc", samples=1, seqlen=512, seed=0,
                        eval_windows=args.eval_windows).evaluation
    base = lm.model.eval()
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    for name in names:
        spec = CONFIGS[name]
        model = copy.deepcopy(base) if spec else base
        t0 = time.perf_counter()
        metrics = prune(model, *spec, calib) if spec else {}
        prune_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        ppl = perplexity(model, evaluation)
        row = {"config": name, "ppl": ppl, "prune_s": prune_s,
               "eval_s": time.perf_counter() - t1, "sparsity": metrics.get("sparsity", 0.0),
               "dsnot_swaps": metrics.get("dsnot_swaps"),
               "calib": f"{args.samples}x{args.seqlen}",
               "eval_tokens": int(evaluation.numel()), "threads": args.threads,
               "machine": platform.machine(), "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model


def dsnot_layers(args) -> None:
    """Per-layer check of DSnoT on SmolLM2: output MSE and mean error of the Wanda 60% mask with
    and without DSnoT, calibrated on half the tokens and measured on the other half."""
    from surgery.data import corpus
    from surgery.models import load_model
    from surgery.passes.prune.dsnot_core import dsnot
    from surgery.passes.prune.masks import row_keep

    torch.set_num_threads(args.threads)
    lm = load_model("zoo:smollm2-135m")
    ids = corpus(lm.tokenizer, "pydoc", samples=args.samples, seqlen=args.seqlen, seed=0).calibration
    names = ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.o_proj",
             "model.layers.3.mlp.down_proj"]
    caps: dict[str, torch.Tensor] = {}

    class Stop(Exception):
        pass

    def hook(name, last):
        def h(mod, a):
            caps[name] = a[0].detach().reshape(-1, a[0].shape[-1]).float()
            if last:
                raise Stop
        return h

    hs = [lm.model.get_submodule(n).register_forward_pre_hook(hook(n, n == names[-1]))
          for n in names]
    with torch.no_grad():
        try:
            lm.model(input_ids=ids, use_cache=False)
        except Stop:
            pass
    for h in hs:
        h.remove()
    print("| layer | mask | held-out output MSE | mean |mean error| | swaps |")
    print("|---|---|---|---|---|")
    for name in names:
        X, W = caps[name], lm.model.get_submodule(name).weight.detach().float()
        half = X.shape[0] // 2
        Xc, Xt = X[:half], X[half:]
        wanda = W.abs() * Xc.norm(dim=0)
        keep0 = row_keep(wanda, 0.6)
        xbar = Xc.sum(0) / (ids.shape[0] // 2)  # Σ tokens / sequences, as the pass does
        keep = dsnot(W, keep0, wanda, wanda, xbar, Xc.var(0, unbiased=False))
        ref = Xt @ W.T
        for label, k in (("wanda 60%", keep0), ("+ dsnot", keep)):
            d = Xt @ (W * k).T - ref
            print(f"| {name} | {label} | {float((d ** 2).mean()):.5f} | "
                  f"{float(d.mean(0).abs().mean()):.5f} | {int((k & ~keep0).sum())} |")


def table(paths: str) -> str:
    """Markdown table from one or more (comma-separated) result files, in CONFIGS order."""
    found = {}
    for path in paths.split(","):
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                found[r["config"]] = r
    rows = [found[c] for c in CONFIGS if c in found]
    dense = next((r["ppl"] for r in rows if r["config"] == "dense"), None)
    out = ["| config | sparsity | perplexity | vs dense | prune time (s) | eval time (s) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / dense:.2f}x" if dense else "-"
        out.append(f"| {r['config']} | {r['sparsity']:.1%} | {r['ppl']:.2f} | {ratio} | "
                   f"{r['prune_s']:.1f} | {r['eval_s']:.1f} |")
    r0 = rows[0]
    out.append("")
    out.append(f"SmolLM2-135M, calibration {r0['calib']} pydoc tokens (seed 0), evaluation "
               f"{r0['eval_tokens']} disjoint pydoc tokens at seqlen 512; torch {r0['torch']}, "
               f"{r0['threads']} threads.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token evaluation windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    ap.add_argument("--out", default="", help="append JSON lines here")
    ap.add_argument("--table", default="", help="print the markdown table of result files "
                    "(comma-separated)")
    ap.add_argument("--dsnot-layers", action="store_true",
                    help="per-layer DSnoT check (output error on held-out tokens) instead")
    args = ap.parse_args()
    if args.dsnot_layers:
        dsnot_layers(args)
        return
    if args.table:
        print(table(args.table))
        return
    run(args)


if __name__ == "__main__":
    main()
