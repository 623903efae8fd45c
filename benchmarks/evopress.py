"""EvoPress vs uniform and heuristic allocations on SmolLM2-135M (issue 16, "must show").

Same held-out protocol as benchmarks/prune.py: every Linear inside the 30 decoder blocks is
compressed (embeddings and the tied lm_head stay dense), calibration on random pydoc windows
(seed 0), perplexity on the first 8 windows of 512 tokens of the disjoint pydoc evaluation
split. Each result is appended as a JSON line as soon as it exists; `--table FILE` prints the
markdown table. Allocation charts (PNG) go to `--charts DIR`.

    python benchmarks/evopress.py --out /tmp/evo.jsonl --charts docs/bench
    python benchmarks/evopress.py --table /tmp/evo.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

# name: (verb, method, statement value, params); the evopress search settings are --gens etc.
CONFIGS = {
    "dense": None,
    "drop 6 cosine": ("drop", "cosine", 6, {}),
    "drop 6 evopress": ("drop", "evopress", 6, {"search": True}),
    "sparsegpt 60% uniform (evopress start)": ("prune", "evopress", "60%",
                                               {"search": True, "db": True, "gens": 0,
                                                "levels": "40,50,60,70,80"}),
    "sparsegpt 60% uniform": ("prune", "sparsegpt", "60%", {}),
    "owl 60% (sparsegpt)": ("prune", "owl", "60%", {"method": "sparsegpt"}),
    "evopress 60% (sparsegpt)": ("prune", "evopress", "60%", {"search": True, "db": True,
                                                            "levels": "40,50,60,70,80"}),
    "sparsegpt 70% uniform (evopress start)": ("prune", "evopress", "70%",
                                               {"search": True, "db": True, "gens": 0,
                                                "levels": "60,70,80"}),
    "sparsegpt 70% uniform": ("prune", "sparsegpt", "70%", {}),
    "owl 70% (sparsegpt)": ("prune", "owl", "70%", {"method": "sparsegpt"}),
    "evopress 70% (sparsegpt)": ("prune", "evopress", "70%", {"search": True, "db": True,
                                                            "levels": "60,70,80"}),
    "gptq int3 g64 uniform (evopress start)": (
        "quantize", "evopress", "int3", {"search": True, "db": True, "gens": 0, "levels": "2,3,4,8",
                                         "method": {"name": "gptq", "kwargs": {"group": 64}}}),
    "gptq int3 g64 uniform": ("quantize", "gptq", "int3", {"group": 64}),
    "evopress int3 (gptq g64)": ("quantize", "evopress", "int3",
                                 {"search": True, "db": True, "levels": "2,3,4,8",
                                  "method": {"name": "gptq", "kwargs": {"group": 64}}}),
}


def compress(model, verb, method, value, extra, calib, args, charts: Path | None, name: str):
    from surgery.passapi import CallValue, Percent, RunContext
    from surgery.progress import LogProgress
    from surgery.registry import get_pass

    P = get_pass(verb, method)
    kw = {k: v for k, v in extra.items() if k not in ("search", "db", "gens", "levels")}
    if isinstance(kw.get("method"), dict):
        kw["method"] = CallValue(**kw["method"])
    kw["data"] = "calib"
    if extra.get("search"):
        kw.update(generations=extra.get("gens", args.gens), offspring=args.offspring,
                  survivors=[args.survivors, 1], tokens=[args.tokens0, args.tokens1],
                  fitness_samples=args.fitness_samples, seed=0,
                  checkpoint=str(Path(args.work) / f"{name.replace(' ', '_')}.ckpt.json"))
    if extra.get("db"):
        levels = extra.get("levels", args.levels)
        kw["database"] = str(Path(args.work) / f"db-{verb}-{value}-{levels}")
        if verb == "prune":
            kw["levels"] = [Percent(value=float(v)) for v in levels.split(",")]
        else:
            kw["levels"] = [int(v) for v in levels.split(",")]
    field = {"prune": "sparsity", "quantize": "format", "drop": "count"}[verb]
    if verb == "prune":
        value = Percent(value=float(value.rstrip("%")))
    p = P(P.Params(**{field: value}, **kw))
    if verb == "drop":
        targets = {f"model.layers.{i}": model.model.layers[i]
                   for i in range(len(model.model.layers))}
    else:
        targets = {n: m for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
    problem = p.check_targets(targets)
    if problem:
        raise SystemExit(f"{name}: {problem}")
    ctx = RunContext(model=model, models={}, data={"calib": calib}, progress=LogProgress())
    rep = p.run(ctx, targets).report
    if charts is not None:
        for fname, data in rep.files.items():
            (charts / f"evopress_{name.split()[0]}_{name.split()[1].rstrip('%')}_"
                      f"{fname.split('-')[-1]}").write_bytes(data)
    return ctx.model, rep


def run(args) -> None:
    from surgery.data import corpus
    from surgery.evaluate import perplexity
    from surgery.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    lm = load_model("zoo:smollm2-135m")
    calib = corpus(lm.tokenizer, "pydoc", samples=args.samples, seqlen=args.seqlen, seed=0,
                   name="calib")
    evaluation = corpus(lm.tokenizer, "pydoc", samples=1, seqlen=512, seed=0,
                        eval_windows=args.eval_windows).evaluation
    base = lm.model.eval()
    charts = Path(args.charts) if args.charts else None
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    for name in names:
        spec = CONFIGS[name]
        model = copy.deepcopy(base) if spec else base
        t0 = time.perf_counter()
        rep = None
        if spec:
            try:
                model, rep = compress(model, *spec, calib, args, charts, name)
            except Exception as e:  # keep going: one failing config must not lose the others
                print(json.dumps({"config": name, "error": repr(e)}), flush=True)
                continue
        took = time.perf_counter() - t0
        t1 = time.perf_counter()
        ppl = perplexity(model, evaluation)
        m = rep.metrics if rep else {}
        row = {"config": name, "ppl": ppl, "compress_s": round(took, 1),
               "eval_s": round(time.perf_counter() - t1, 1),
               "sparsity": m.get("sparsity"), "generations": m.get("generations"),
               "search_s": m.get("search_seconds"), "database_s": m.get("database_seconds"),
               "best_kl": m.get("best_kl"), "evaluations": m.get("fitness_evaluations"),
               "average": next((v for k, v in m.items() if k.startswith("average_")), None),
               "dropped": m.get("dropped"), "start": m.get("start"),
               "levels": ({k: v.get("sparsity_level", v.get("bits"))
                           for k, v in rep.per_module.items()} if rep and m.get("generations")
                          else None),
               "calib": f"{args.samples}x{args.seqlen}", "eval_tokens": int(evaluation.numel()),
               "levels_given": (spec[3].get("levels") if spec else None),
               "search": {"offspring": args.offspring, "stages": [[args.survivors, args.tokens0],
                                                                  [1, args.tokens1]],
                          "fitness_samples": args.fitness_samples, "levels": args.levels},
               "threads": args.threads, "machine": platform.machine(),
               "load": os.getloadavg()[0], "torch": torch.__version__}
        print(json.dumps({k: v for k, v in row.items() if k != "levels"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model


def table(paths: str) -> str:
    found = {}
    for path in paths.split(","):
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                found[r["config"]] = r
    rows = [found[c] for c in CONFIGS if c in found]
    dense = next((r["ppl"] for r in rows if r["config"] == "dense"), None)
    out = ["| config | perplexity | vs dense | budget, realised | generations | search (s) | "
           "database (s) | compress total (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / dense:.2f}x" if dense else "-"
        if r.get("dropped"):
            budget = f"{len(r['dropped'])} blocks dropped"
        elif r.get("sparsity") is not None:
            budget = f"{100 * r['sparsity']:.3f}% zeros"
            if r.get("average") is not None:
                budget += f" (levels average {r['average']:g}%)"
        elif r.get("average") is not None:
            budget = f"{r['average']:g} bits average"
        else:
            budget = "-"
        gens = r.get("generations")
        out.append(f"| {r['config']} | {r['ppl']:.2f} | {ratio} | {budget} | "
                   f"{'-' if gens is None else gens} | {r.get('search_s') or '-'} | "
                   f"{r.get('database_s') or '-'} | {r['compress_s']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gens", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=6)
    ap.add_argument("--survivors", type=int, default=2)
    ap.add_argument("--tokens0", type=int, default=64)
    ap.add_argument("--tokens1", type=int, default=256)
    ap.add_argument("--fitness-samples", type=int, default=8)
    ap.add_argument("--levels", default="40,50,60,70,80,90")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "evopress-bench"))
    ap.add_argument("--configs", default="")
    ap.add_argument("--charts", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--table", default="")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    run(args)


if __name__ == "__main__":
    main()
