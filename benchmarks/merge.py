"""Merge benchmark (2-core CPU is enough; prints markdown tables).

Part 1, digits (scikit-learn's 8x8 digits, real data shipped with the package): pairs of small MLPs
and small residual CNNs with BatchNorm, trained from different seeds on the same labels and on
disjoint label splits (0-4 vs 5-9). Accuracy of each endpoint, their ensemble, naive averaging,
weight matching (Git Re-Basin) and PLeaS at widths 1.0, 1.25, 1.5, 2.0, with merge times.

Part 2, LoRA on SmolLM2-135M: two LoRA fine-tunes on different pydoc topics, folded into full
weights and merged into the base with task arithmetic, TIES and WIDEN; held-out loss of every model
on both topics.

    python benchmarks/merge.py [--part digits|lora|all] [--save out/merge-bench]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.passes.merge.bn import recompute_bn_stats
from surgery.passes.merge.heads import ConcatHeads
from surgery.passes.merge.matching import weight_matching
from surgery.passes.merge.permspec import apply_perm, derive_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.passes.merge_nets import ResCNN  # noqa: E402 - the same nets the tests use
from surgery.passes.merge.pleas import pleas_merge

torch.set_num_threads(int(__import__('os').environ.get('BENCH_THREADS', '2')))


# --- digits --------------------------------------------------------------------------------

def make(kind, classes, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, classes))
    return ResCNN(16, classes)


HEAD = {"mlp": "4", "cnn": "fc"}


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3, random_state=0,
                              stratify=y.numpy())
    return X[tr], y[tr], X[te], y[te]


def shape(kind, X):
    return X.view(-1, 1, 8, 8) if kind == "cnn" else X


def train(model, X, y, seed, epochs=30):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def acc(logits, y):
    return float((logits.argmax(1) == y).float().mean())


def average(a, b, perms=None, spec=None):
    sb = b.state_dict() if perms is None else apply_perm(spec, perms, b.state_dict())
    m = copy.deepcopy(a)
    m.load_state_dict({k: (v + sb[k]) / 2 if v.is_floating_point() else v
                       for k, v in a.state_dict().items()})
    return m


def separate_heads(merged_backbone, a, b, head, perms=None, spec=None):
    """A backbone merge with both original heads (model 2's head permuted like its features)."""
    m = copy.deepcopy(merged_backbone)
    h2 = copy.deepcopy(b.get_submodule(head))
    if perms is not None:
        sb = apply_perm(spec, perms, b.state_dict())
        h2.weight.data = sb[f"{head}.weight"]
    parent, _, child = head.rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, child,
            ConcatHeads(copy.deepcopy(a.get_submodule(head)), h2))
    return m


def run_digits(rows_out, kinds=("mlp", "cnn")):
    Xtr, ytr, Xte, yte = digits()
    for kind in kinds:
        xtr, xte = shape(kind, Xtr), shape(kind, Xte)
        calib = list(xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))]
                     .split(64))
        for setting in ("same labels", "disjoint labels"):
            if setting == "same labels":
                a = train(make(kind, 10, 0), xtr, ytr, 0)
                b = train(make(kind, 10, 1), xtr, ytr, 1)
                ev = lambda m: acc(m(xte), yte)  # noqa: E731
                endpoints = {"model A": ev(a), "model B": ev(b)}
                ens = acc((a(xte) + b(xte)) / 2, yte)
                head = None
            else:
                ma, mb = ytr < 5, ytr >= 5
                a = train(make(kind, 5, 0), xtr[ma], ytr[ma], 0)
                b = train(make(kind, 5, 1), xtr[mb], ytr[mb] - 5, 1)
                ta, tb = yte < 5, yte >= 5

                def ev(m):  # task-aware (each head on its own task) and joint 10-way accuracy
                    out = m(xte)
                    per = 0.5 * (acc(out[ta][:, :5], yte[ta]) + acc(out[tb][:, 5:], yte[tb] - 5))
                    return per, acc(out, yte)
                endpoints = {"model A (task 0-4)": acc(a(xte[ta]), yte[ta]),
                             "model B (task 5-9)": acc(b(xte[tb]), yte[tb] - 5)}
                ens = ev(lambda x: torch.cat([a(x), b(x)], 1))
                head = HEAD[kind]
            spec = derive_spec(a, (xtr[:4],))
            res = {}
            t0 = time.perf_counter()
            naive = average(a, b)
            if head:
                naive = separate_heads(naive, a, b, head)
            recompute_bn_stats(naive, calib)
            res["naive average"] = (ev(naive), time.perf_counter() - t0)
            t0 = time.perf_counter()
            P, _ = weight_matching(spec, a.state_dict(), b.state_dict())
            wm = average(a, b, P, spec)
            if head:
                wm = separate_heads(wm, a, b, head, P, spec)
            recompute_bn_stats(wm, calib)
            res["weight matching"] = (ev(wm), time.perf_counter() - t0)
            for w in (1.0, 1.25, 1.5, 2.0):
                t0 = time.perf_counter()
                m, info = pleas_merge(a, b, calib, width=w, head=head)
                res[f"PLeaS width {w:g}"] = (ev(m), time.perf_counter() - t0,
                                             info["compute_ratio"])
            rows_out.append((kind, setting, endpoints, ens, res))
            print_digits(rows_out[-1:])  # as soon as it is known


def fmt(v):
    if isinstance(v, tuple):
        return f"{100 * v[0]:.1f} / {100 * v[1]:.1f}"
    return f"{100 * v:.1f}"


def print_digits(rows):
    for kind, setting, endpoints, ens, res in rows:
        disj = setting.startswith("disjoint")
        unit = "task-aware / joint 10-way accuracy %" if disj else "accuracy %"
        print(f"\n### {kind.upper()}, {setting} ({unit})\n")
        print("| model | accuracy | compute vs one model | merge time (s) |")
        print("|---|---|---|---|")
        for k, v in endpoints.items():
            print(f"| {k} | {fmt(v)} | 1.00 | |")
        print(f"| ensemble (A and B) | {fmt(ens)} | 2.00 | |")
        for k, v in res.items():
            ratio = f"{v[2]:.2f}" if len(v) > 2 else "1.00"
            print(f"| {k} | {fmt(v[0])} | {ratio} | {v[1]:.2f} |")
        best = max(v if not isinstance(v, tuple) else v for v in endpoints.values())
        p1 = res["PLeaS width 1"][0]
        p1 = p1[0] if isinstance(p1, tuple) else p1
        nv = res["naive average"][0]
        nv = nv[0] if isinstance(nv, tuple) else nv
        print(f"\nPLeaS at width 1.0 keeps {100 * p1 / best:.1f}% of the better endpoint "
              f"({'task-aware ' if disj else ''}accuracy); naive averaging keeps "
              f"{100 * nv / best:.1f}%.", flush=True)


# --- LoRA on SmolLM2 ---------------------------------------------------------------------------

TOPICS = {"strings": ("formatstrings", "strings", "string-methods", "typesseq", "typesseq-mutable",
                      "specialattrs", "formatting"),
          "exceptions": ("exceptions", "try", "raise", "assert", "with", "context-managers",
                         "execmodel", "bltin-exceptions", "naming")}


def topic_windows(tok, keys, seqlen=128):
    from surgery.data import pydoc_topics

    t = pydoc_topics()
    text = "\n\n".join(t[k] for k in keys if k in t)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // seqlen
    w = ids[: n * seqlen].view(n, seqlen)
    held = max(4, n // 8)
    return w[:-held], w[-held:]


@torch.no_grad()
def lm_loss(model, windows, bs=4):
    tot, cnt = 0.0, 0
    for i in range(0, len(windows), bs):
        x = windows[i:i + bs]
        out = model(x, labels=x)
        tot += float(out.loss) * x.numel()
        cnt += x.numel()
    return tot / cnt


def lora_finetune(base, train_w, seed, steps=24, batch=2):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    m.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_w), (batch,), generator=g)
        loss = m(train_w[idx], labels=train_w[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.merge_and_unload().eval()


def run_lora(save: str | None = None):
    from surgery.models import load_model
    from surgery.passapi import RunContext
    from surgery.progress import Progress
    from surgery.registry import get_pass

    lm = load_model("zoo:smollm2-135m")
    base = lm.model.eval()
    data = {k: topic_windows(lm.tokenizer, v) for k, v in TOPICS.items()}
    t0 = time.perf_counter()
    fa = lora_finetune(base, data["strings"][0], 0)
    fb = lora_finetune(base, data["exceptions"][0], 1)
    ft_time = time.perf_counter() - t0
    models = {"base": base, "ft_strings": fa, "ft_exceptions": fb}
    if save:  # HF directories for examples/merge_*.surg
        from pathlib import Path

        for name in ("ft_strings", "ft_exceptions"):
            models[name].save_pretrained(Path(save) / name)
            lm.tokenizer.save_pretrained(Path(save) / name)
    rows = {"base": base, "LoRA fine-tune: strings": fa, "LoRA fine-tune: exceptions": fb}
    times = {}
    for label, method, kw in (("task arithmetic (scale=1)", "task_arithmetic", {}),
                              ("TIES (density 0.5, scale=1)", "ties", {"density": 0.5}),
                              ("WIDEN (t=1, s=1)", "widen", {})):
        P = get_pass("merge", method)
        p = P(P.Params(models=["ft_strings", "ft_exceptions"], base="base", **kw))
        ctx = RunContext(model=base, models=models, data={}, progress=Progress())
        t0 = time.perf_counter()
        merged = p.run(ctx, {}).model
        times[label] = time.perf_counter() - t0
        rows[label] = merged
    print("\n### LoRA fine-tunes of SmolLM2-135M merged into the base (held-out loss, nats/token)\n")
    print(f"Fine-tuning: LoRA r=8 on q/v/up/down, 24 AdamW steps (lr 2e-3) of 2x128 tokens each "
          f"({ft_time:.0f} s for both); held-out windows: "
          f"{len(data['strings'][1])} (strings), {len(data['exceptions'][1])} (exceptions).\n")
    print("| model | strings loss | exceptions loss | mean | merge time (s) |")
    print("|---|---|---|---|---|")
    for label, m in rows.items():
        la, lb = lm_loss(m, data["strings"][1]), lm_loss(m, data["exceptions"][1])
        t = f"{times[label]:.1f}" if label in times else ""
        print(f"| {label} | {la:.3f} | {lb:.3f} | {(la + lb) / 2:.3f} | {t} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["digits", "lora", "all"])
    ap.add_argument("--kind", default="both", choices=["mlp", "cnn", "both"])
    ap.add_argument("--save", default=None, help="write the two LoRA fine-tunes as HF dirs here")
    args = ap.parse_args()
    print("Machine: 2-core CPU, no GPU; torch", torch.__version__, flush=True)
    if args.part in ("digits", "all"):
        run_digits([], ("mlp", "cnn") if args.kind == "both" else (args.kind,))
    if args.part in ("lora", "all"):
        run_lora(args.save)
