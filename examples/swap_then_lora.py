"""Swap SmolLM2-135M's attention softmax, then win the perplexity back with a short LoRA fine-tune.

What it shows: a normaliser swap breaks a pretrained softmax model (the swap step itself reports
perplexity before and right after the swap), and LoRA adapters attached in the same script recover
most of it in a few minutes of training. The .surg language has no training statement, so the
surgery is a script and the training a plain PyTorch loop:

1. load zoo:smollm2-135m and apply, in one program,
       swap  softmax in modules("model.layers.*.self_attn") for stablemax(data=calib)
       adapt modules("**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj") with lora(r=16, alpha=32)
   (`--method lssar`: softplus(reweight=true, p=3) instead of stablemax);
2. train only the adapter parameters (AdamW lr 1e-3, batch 4 x 128 tokens) on pydoc calibration
   windows; the base weights stay frozen (the adapt pass froze them);
3. report perplexity on the swap step's evaluation windows (disjoint from the training windows)
   again, and optionally save the result (`--save DIR`, reloadable with `surgery.load`).

Run:   python examples/swap_then_lora.py [--method stablemax|lssar] [--steps 100] [--threads 1]
Takes: about 15 minutes with the defaults on a 2-core x86-64 CPU, one thread, no GPU (mostly the
100 forward+backward passes; docs/bench/attention.md has the measured numbers).
"""

from __future__ import annotations

import argparse
import time

import torch

import surgery
from surgery.data import corpus
from surgery.evaluate import perplexity
from surgery.models import load_model

SEQLEN, EVAL_WINDOWS = 128, 32
NORMALISERS = {"stablemax": "stablemax(data=calib)", "lssar": "softplus(reweight=true, p=3, data=calib)"}

SCRIPT = """surgery 1
data  calib = corpus("pydoc", samples=4, seqlen={seqlen}, eval_windows={windows})
swap  softmax in modules("model.layers.*.self_attn") for {normaliser}
adapt modules("**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj") with lora(r=16, alpha=32)
"""


def main(method: str = "stablemax", steps: int = 100, batch: int = 4, lr: float = 1e-3,
         save: str | None = None, log_every: int = 10, eval_windows: int = EVAL_WINDOWS) -> dict:
    t0 = time.time()
    loaded = load_model("zoo:smollm2-135m")
    script = SCRIPT.format(seqlen=SEQLEN, windows=eval_windows, normaliser=NORMALISERS[method])
    print(script)
    result = surgery.compile(script).apply(loaded, seed=0)
    swap_step = next(s for s in result.report.steps if s.verb == "swap")
    before = swap_step.report.metrics["perplexity_before"]
    after_swap = swap_step.report.metrics["perplexity_after"]
    print(f"perplexity before the swap {before:.2f}, right after it {after_swap:.2f}")

    model = result.model
    # Same stream, seqlen and eval_windows as `calib`, so the same evaluation windows as the report.
    data = corpus(loaded.tokenizer, "pydoc", samples=steps * batch, seqlen=SEQLEN, seed=1,
                  eval_windows=eval_windows)
    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA A/B matrices only
    print(f"training {sum(p.numel() for p in params):,} adapter parameters of "
          f"{sum(p.numel() for p in model.parameters()):,}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    t_train = time.time()
    for step, ids in enumerate(data.batches(batch), 1):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t_train:.0f} s)", flush=True)
    model.eval()
    train_seconds = time.time() - t_train
    after_lora = perplexity(model, data.evaluation)
    print(f"perplexity: before swap {before:.2f} | after swap {after_swap:.2f} | "
          f"after {steps} LoRA steps {after_lora:.2f}  (total {time.time() - t0:.0f} s)")
    if save:
        from surgery.emit import save as save_model

        save_model(model, save, {"example": "swap_then_lora", "script": script}, tokenizer=loaded.tokenizer)
        print(f"saved to {save}; reload with surgery.load({save!r})")
    return {"method": method, "steps": steps, "batch": batch, "seqlen": SEQLEN, "lr": lr,
            "perplexity_before": before, "perplexity_after_swap": after_swap,
            "perplexity_after_lora": after_lora, "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(NORMALISERS), default="stablemax")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save", help="directory to save the fine-tuned model to")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (1 on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.method, args.steps, args.batch, args.lr, args.save)
