"""Kernel benchmarks: Triton kernels vs their PyTorch equivalents and vs the device's limits.

    python benchmarks/kernels.py [--quick] [--out DIR]

Needs a CUDA GPU (without one it says so and exits 0). For each kernel and shape it reports the
time, the achieved GB/s (memory-bound kernels) or TFLOP/s (attention, GEMM), the speed-up over the
PyTorch equivalent and the fraction of the measured copy bandwidth. Prints a table, writes
``kernels.csv`` and ``kernels.png`` to DIR (default benchmarks/out) and checks the issue's targets:

- StableMax forward >= 85% of measured copy bandwidth for rows of 4096 and longer;
- softplus attention forward >= 60% of scaled_dot_product_attention's throughput at sequence 4096,
  head dim 64, fp16 (causal);
- int4 GEMV at batch 1 >= 3x faster than fp16 torch.matmul for 4096 x 4096.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch


def _bench(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of ``fn`` (CUDA events, cache flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write) on a 1 GiB buffer: the achievable DRAM roof."""
    n = (1 << 30) // 4
    x = torch.empty(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    del x, y
    return 2 * n * 4 / ms / 1e6


def _row(rows, kernel, shape, dtype, ms, ref_ms, ref_name, gbs=None, tflops=None, roof=None):
    rows.append({
        "kernel": kernel, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
        "ms": round(ms, 4), "GB/s": None if gbs is None else round(gbs, 1),
        "TFLOP/s": None if tflops is None else round(tflops, 2),
        "baseline": ref_name, "baseline_ms": round(ref_ms, 4),
        "speedup": round(ref_ms / ms, 2),
        "pct_of_copy_bw": None if gbs is None or roof is None else round(100 * gbs / roof, 1),
    })


def bench_rowwise(rows, roof, quick):
    from surgery.backends.ops import stablemax as sm
    from surgery.backends.triton import softmax as tsm
    from surgery.backends.triton import stablemax as tst

    sizes = [1024, 4096, 32768] if quick else [256, 1024, 4096, 8192, 16384, 32768, 65536]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in sizes:
            m = max(64, (1 << 26) // n)  # ~64M elements per call: out of cache
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            g = torch.randn_like(x)
            nbytes = x.numel() * x.element_size()
            shape = f"{m}x{n}"
            ref = _bench(lambda: sm.stablemax_reference(x, -1))
            for log in (False, True):
                name = "log_stablemax fwd" if log else "stablemax fwd"
                ms = _bench(lambda: tst.stablemax_forward(x, -1, log))
                _row(rows, name, shape, dtype, ms, ref, "eager reference", 2 * nbytes / ms / 1e6,
                     roof=roof)
            ref_b = _bench(lambda: sm.stablemax_backward_reference(x, g, -1, False))
            ms = _bench(lambda: tst.stablemax_backward(x, g, -1, False))
            _row(rows, "stablemax bwd", shape, dtype, ms, ref_b, "eager reference",
                 3 * nbytes / ms / 1e6, roof=roof)
            ref_s = _bench(lambda: torch.softmax(x, -1))
            for alg in ("fused", "online", "two_pass"):
                ms = _bench(lambda: tsm.softmax_forward(x, -1, alg))
                _row(rows, f"softmax {alg}", shape, dtype, ms, ref_s, "torch.softmax",
                     2 * nbytes / ms / 1e6, roof=roof)
            del x, g


def bench_attention(rows, quick):
    import torch.nn.functional as F

    from surgery.backends.triton import softplus_attention as tsa

    b, h, d = 4, 16, 64
    lengths = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192]
    for length in lengths:
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.float16)
                   for _ in range(3))
        flops = 4 * b * h * length * length * d / 2  # causal: half the score matrix
        ref = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        for power, name in ((0.0, "LSSA fwd"), (15.0, "LSSAR fwd")):
            ms = _bench(lambda: tsa.softplus_attention_forward(q, k, v, None, True, power))
            _row(rows, name, f"B{b} H{h} L{length} D{d}", torch.float16, ms, ref,
                 "SDPA (softmax, causal)", tflops=flops / ms / 1e9)
        del q, k, v


def bench_quant(rows, roof, quick):
    from surgery.backends.ops import quant as Q
    from surgery.backends.triton import quant_matmul as tqm

    n = k = 4096
    group = 128
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int8)
    qw4 = Q.pack_int4(codes)
    qw8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scales = torch.rand(n, k // group, device="cuda") * 0.01
    zeros = torch.randint(0, 16, (n, k // group), device="cuda", dtype=torch.uint8)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
    batches = [1, 16, 512] if quick else [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = _bench(lambda: torch.matmul(x, w16.T))
        flops = 2 * m * n * k
        for bits, fn in ((4, lambda: tqm.int4_linear(x, qw4, scales, zeros, None, k)),
                         (8, lambda: tqm.int8_linear(x, qw8, scales, None, None))):
            ms = _bench(fn)
            wbytes = n * k * bits // 8 + scales.numel() * 4 + m * k * 2 + m * n * 2
            path = ("GEMV" if m <= tqm.GEMV_MAX_ROWS
                    else "dequant+GEMM" if tqm.GEMM_VIA_DEQUANT else "GEMM")
            _row(rows, f"int{bits} {path}", f"{m}x{k} @ {k}x{n}", torch.float16, ms, ref,
                 "fp16 torch.matmul", gbs=wbytes / ms / 1e6, tflops=flops / ms / 1e9, roof=roof)
        del x


def check_targets(rows) -> list[str]:
    lines = []

    def pick(kernel, pred):
        return [r for r in rows if r["kernel"] == kernel and pred(r)]

    sm_rows = pick("stablemax fwd", lambda r: int(r["shape"].split("x")[1]) >= 4096)
    if sm_rows:
        worst = min(r["pct_of_copy_bw"] for r in sm_rows)
        lines.append(f"StableMax fwd, rows >= 4096: worst {worst}% of copy bandwidth "
                     f"(target >= 85%): {'MET' if worst >= 85 else 'MISSED'}")
    att = pick("LSSA fwd", lambda r: "L4096 " in r["shape"])
    if att:
        ratio = att[0]["speedup"]
        lines.append(f"LSSA fwd at L=4096, D=64, fp16: {100 * ratio:.0f}% of SDPA throughput "
                     f"(target >= 60%): {'MET' if ratio >= 0.6 else 'MISSED'}")
    gemv = pick("int4 GEMV", lambda r: r["shape"].startswith("1x"))
    if gemv:
        s = gemv[0]["speedup"]
        lines.append(f"int4 GEMV batch 1, 4096x4096: {s}x fp16 torch.matmul (target >= 3x): "
                     f"{'MET' if s >= 3 else 'MISSED'}")
    return lines


def write_outputs(rows, out: Path, device: str, roof: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "copy_GB/s", *rows[0].keys()])
        w.writeheader()
        for r in rows:
            w.writerow({"device": device, "copy_GB/s": round(roof, 1), **r})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    bw = [r for r in rows if r["pct_of_copy_bw"] is not None and "GEMV" not in r["kernel"]
          and "GEMM" not in r["kernel"] and r["dtype"] == "float16"]
    for kernel in sorted({r["kernel"] for r in bw}):
        pts = [r for r in bw if r["kernel"] == kernel]
        axes[0].plot([int(r["shape"].split("x")[1]) for r in pts],
                     [r["pct_of_copy_bw"] for r in pts], marker="o", label=kernel)
    axes[0].set(xscale="log", xlabel="row length (fp16)", ylabel="% of copy bandwidth",
                title="row-wise kernels")
    axes[0].axhline(85, ls="--", c="gray")
    axes[0].legend(fontsize=7)
    att = [r for r in rows if "LSSA" in r["kernel"]]
    for kernel in sorted({r["kernel"] for r in att}):
        pts = [r for r in att if r["kernel"] == kernel]
        axes[1].plot([int(r["shape"].split("L")[1].split()[0]) for r in pts],
                     [100 * r["speedup"] for r in pts], marker="o", label=kernel)
    axes[1].axhline(60, ls="--", c="gray")
    axes[1].set(xscale="log", xlabel="sequence length", ylabel="% of SDPA throughput",
                title="softplus attention, fp16, D=64")
    axes[1].legend(fontsize=7)
    qm = [r for r in rows if "GEMV" in r["kernel"] or "GEMM" in r["kernel"]]
    for bits in (4, 8):
        pts = [r for r in qm if r["kernel"].startswith(f"int{bits}")]
        axes[2].plot([int(r["shape"].split("x")[0]) for r in pts], [r["speedup"] for r in pts],
                     marker="o", label=f"int{bits}")
    axes[2].axhline(1, ls="--", c="gray")
    axes[2].set(xscale="log", xlabel="rows of x (batch x tokens)",
                ylabel="speed-up over fp16 matmul", title="weight-only matmul, 4096x4096")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"surgery Triton kernels on {device} (copy bandwidth {roof:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(out / "kernels.png", dpi=120)


def print_table(rows) -> None:
    cols = ["kernel", "shape", "dtype", "ms", "GB/s", "TFLOP/s", "pct_of_copy_bw", "baseline",
            "speedup"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(widths[c]) for c in cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; none is available here, so nothing was "
              "measured (the kernels are tested on CPU with TRITON_INTERPRET=1 instead).")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to benchmark compiled kernels")
        return 2
    import surgery.backends.triton  # noqa: F401 - registers the CUDA kernels

    device = torch.cuda.get_device_name()
    torch.manual_seed(0)
    roof = copy_bandwidth()
    print(f"device: {device}; measured copy bandwidth {roof:.0f} GB/s")
    rows: list[dict] = []
    bench_rowwise(rows, roof, args.quick)
    bench_attention(rows, args.quick)
    bench_quant(rows, roof, args.quick)
    print_table(rows)
    for line in check_targets(rows):
        print(line)
    write_outputs(rows, Path(args.out), device, roof)
    print(f"wrote {Path(args.out) / 'kernels.csv'} and {Path(args.out) / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
