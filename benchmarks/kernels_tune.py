"""Sweep the launch parameters of the Triton kernels on a CUDA GPU and print the best of each.

    python benchmarks/kernels_tune.py [--only gemv,stablemax,attention,gemm]

This is how the defaults in backends/triton/*.py (GEMV_BLOCK_N ..., PROGRAMS_PER_SM, TILE,
BLOCK_M ...) were chosen; re-run it on a new GPU and update them. Every configuration is checked
against the reference before it is timed, so a fast wrong one cannot win. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _report(title: str, results: list[tuple[float, str, float]], ref_ms: float | None,
            ref_name: str, top: int = 6) -> None:
    results.sort()
    print(f"\n## {title}" + (f" (baseline {ref_name}: {ref_ms:.4f} ms)" if ref_ms else ""))
    for ms, cfg, err in results[:top]:
        speed = f"  {ref_ms / ms:5.2f}x baseline" if ref_ms else ""
        print(f"  {ms:.4f} ms{speed}  rel err {err:.1e}  {cfg}")


def tune_gemv() -> None:
    from surgery.backends.ops import quant as Q
    from surgery.backends.triton import quant_matmul as tqm

    n = k = 4096
    group = 128
    g = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int8)
    qw = {4: Q.pack_int4(codes),
          8: torch.randint(-127, 128, (n, k), device="cuda", generator=g).to(torch.int8)}
    scales = torch.rand(n, k // group, device="cuda", generator=g) * 0.01
    zeros = {4: torch.randint(0, 16, (n, k // group), device="cuda", generator=g,
                              dtype=torch.uint8), 8: None}
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g)
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        ref_ms = _bench(lambda: torch.matmul(x, w16.T))
        for bits in (4, 8):
            ref = (Q.int4_linear(x, qw[4], scales, zeros[4], None, k) if bits == 4
                   else Q.int8_linear(x, qw[8], scales, None, None))
            res = []
            for bn, bk, warps in itertools.product((1, 2, 4, 8), (1024, 2048, 4096), (1, 2, 4)):
                tqm.GEMV_WARPS = warps
                fn = (lambda: tqm.quant_linear(x, qw[bits], scales, zeros[bits], None, bits, k,
                                               block_n=bn, block_k=bk))
                res.append((_bench(fn), f"block_n={bn} block_k={bk} warps={warps}",
                            _rel(fn(), ref)))
            _report(f"int{bits} GEMV {m}x{k} @ {k}x{n}", res, ref_ms, "fp16 torch.matmul")


def tune_gemm() -> None:
    from surgery.backends.ops import quant as Q
    from surgery.backends.triton import quant_matmul as tqm

    n = k = 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    qw = Q.pack_int4(torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int8))
    scales = torch.rand(n, k // 128, device="cuda", generator=g) * 0.01
    zeros = torch.randint(0, 16, (n, k // 128), device="cuda", generator=g, dtype=torch.uint8)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g)
    for m in (8, 16, 64, 256, 1024, 4096):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        ref_ms = _bench(lambda: torch.matmul(x, w16.T))
        ref = Q.int4_linear(x, qw, scales, zeros, None, k)
        res = []
        for via in (True, False):
            fn = (lambda: tqm.quant_linear(x, qw, scales, zeros, None, 4, k, gemv_max_rows=0,
                                           gemm_via_dequant=via))
            res.append((_bench(fn), "dequant + cuBLAS" if via else "Triton _gemm",
                        _rel(fn(), ref)))
        _report(f"int4 GEMM {m}x{k} @ {k}x{n}", res, ref_ms, "fp16 torch.matmul")


def tune_stablemax() -> None:
    from surgery.backends.ops import stablemax as sm
    from surgery.backends.triton import stablemax as tst

    nbytes_roof = _copy_bandwidth()
    for dtype, n in itertools.product((torch.float32, torch.bfloat16), (32768, 65536)):
        m = (1 << 26) // n
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        ref = sm.stablemax_reference(x, -1)
        gbs = lambda ms: 2 * x.numel() * x.element_size() / ms / 1e6  # noqa: E731
        res = []
        for tile, warps, pps, stages in itertools.product((4096, 8192), (16,), (1, 2, 4),
                                                          (1, 2, 3)):
            tst.PROGRAMS_PER_SM, tst.TWO_PASS_WARPS, tst.TWO_PASS_STAGES = pps, warps, stages
            fn = lambda: tst.stablemax_forward(x, -1, False, max_fused=0, tile=tile)  # noqa: E731
            ms = _bench(fn)
            res.append((ms, f"two-pass tile={tile} warps={warps} programs/SM={pps} stages={stages} "
                            f"({100 * gbs(ms) / nbytes_roof:.0f}% of copy)", _rel(fn(), ref)))
        for warps in (16, 32):
            if n * x.element_size() > 128 * 1024:
                continue  # a row above 128 KB cannot sit in one SM's registers
            tst.FUSED_WARPS_LONG = warps
            fn = lambda: tst.stablemax_forward(x, -1, False, max_fused=n)  # noqa: E731
            ms = _bench(fn)
            res.append((ms, f"fused warps={warps} ({100 * gbs(ms) / nbytes_roof:.0f}% of copy)",
                        _rel(fn(), ref)))
        tst.FUSED_WARPS_LONG = 16
        _report(f"stablemax fwd {m}x{n} {dtype}", res, None, "", top=4)
        del x, ref


def _copy_bandwidth() -> float:
    x = torch.empty((1 << 30) // 4, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    print(f"copy bandwidth {2 * x.numel() * 4 / ms / 1e6:.0f} GB/s")
    return 2 * x.numel() * 4 / ms / 1e6


def tune_attention() -> None:
    import torch.nn.functional as F

    from surgery.backends.ops import softplus_attention as spa
    from surgery.backends.triton import softplus_attention as tsa

    b, h, length, d = 4, 16, 4096, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.float16, generator=g)
               for _ in range(3))
    ref_ms = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    configs = [(64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 4, 4),
               (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 8, 3),
               (128, 64, 4, 3), (64, 256, 8, 3)]
    for power in (0.0, 15.0):
        sub = slice(0, 1) if power else slice(None)  # reference on one batch: memory
        ref = spa.softplus_attention_reference(q[sub], k[sub], v[sub], None, True, power)
        res = []
        for bm, bn, warps, stages in configs:
            fn = (lambda: tsa.softplus_attention_forward(q, k, v, None, True, power, block_m=bm,
                                                         block_n=bn, num_warps=warps,
                                                         num_stages=stages))
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects (smem)
                print(f"  skipped {bm}x{bn} w{warps} s{stages}: {type(e).__name__}")
                continue
            res.append((_bench(fn), f"block_m={bm} block_n={bn} warps={warps} stages={stages}",
                        _rel(out[sub], ref)))
        _report(f"{'LSSAR' if power else 'LSSA'} fwd B{b} H{h} L{length} D{d} fp16", res, ref_ms,
                "SDPA causal")
        del ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="gemv,stablemax,attention,gemm")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_tune.py needs a CUDA GPU")
        return 0
    import surgery.backends.triton  # noqa: F401

    print(f"device: {torch.cuda.get_device_name()}")
    for name in args.only.split(","):
        t0 = time.time()
        {"gemv": tune_gemv, "gemm": tune_gemm, "stablemax": tune_stablemax,
         "attention": tune_attention}[name]()
        print(f"  ({name}: {time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
