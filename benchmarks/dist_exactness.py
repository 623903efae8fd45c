"""What the ordered fold of surgery.distributed buys: Hessians and GPTQ codes from per-rank
partial sums added afterwards (a plain all-reduce) against the one-process batch order.

    python benchmarks/dist_exactness.py [--layers 2] [--samples 16] [--seqlen 512] [--batch 2]

On SmolLM2-135M: the float32 XᵀX of each calibration batch is summed in float64 in batch order
(one process, and surgery's fold over N ranks), or per rank and then across ranks (what an
all-reduce of partial sums gives, N = 2, 4, 8). Printed per layer: how many elements of the
float32 Hessian differ from the one-process one, the largest relative difference, and how many
GPTQ int4 g64 codes differ.
"""

from __future__ import annotations

import argparse

import torch


class _Stop(Exception):
    pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from surgery.data import corpus
    from surgery.models import load_model
    from surgery.passes.quantize.formats import Format
    from surgery.passes.quantize.gptq import gptq_quantize

    lm = load_model("zoo:smollm2-135m")
    model = lm.model.eval()
    calib = corpus(lm.tokenizer, "pydoc", samples=args.samples, seqlen=args.seqlen).calibration
    names = [f"model.layers.{i}.{p}" for i in range(args.layers)
             for p in ("self_attn.q_proj", "mlp.down_proj")]
    grams: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    last = names[-1]

    def hook(name):
        def fn(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            grams[name].append(x.T @ x)
            if name == last:
                raise _Stop
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, calib.shape[0], args.batch):
            try:
                model(input_ids=calib[i:i + args.batch], use_cache=False)
            except _Stop:
                pass
    for h in handles:
        h.remove()
    n_batches = len(grams[last])
    fmt = Format(4, False)  # int4, asymmetric (the gptq default)
    print(f"{n_batches} batches of {args.batch} x {args.seqlen} tokens")
    print("| layer | ranks | Hessian elements differing | max relative difference | "
          "GPTQ codes differing |")
    print("|---|---|---|---|---|")
    for name in names:
        gs = grams[name]
        seq = torch.zeros_like(gs[0], dtype=torch.float64)
        for g in gs:
            seq += g
        h_seq = (seq * (2.0 / args.samples)).float()
        W = model.get_submodule(name).weight.detach()
        ref = gptq_quantize(W, h_seq, fmt, 64)
        for ranks in (2, 4, 8):
            if ranks > n_batches:
                continue
            bounds = [round(r * n_batches / ranks) for r in range(ranks + 1)]
            total = torch.zeros_like(seq)
            for r in range(ranks):
                part = torch.zeros_like(seq)
                for g in gs[bounds[r]:bounds[r + 1]]:
                    part += g
                total += part
            h = (total * (2.0 / args.samples)).float()
            diff = int((h != h_seq).sum())
            rel = float(((h.double() - h_seq.double()).abs() / h_seq.double().abs().clamp_min(
                1e-30)).max())
            q = gptq_quantize(W, h, fmt, 64)
            codes = f"{int((q.codes != ref.codes).sum())} of {ref.codes.numel()}"
            print(f"| {name} | {ranks} | {diff} of {h.numel()} | {rel:.2e} | {codes} |")


if __name__ == "__main__":
    main()
