"""Compile every kernel ahead of time for NVIDIA targets, without a GPU.

Triton lowers a kernel to TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (ptxas ships in the wheel), so a
CPU-only machine can check that the kernels compile for real GPUs, not only that they run in the
interpreter. ``python -m surgery.backends.triton.aot [--all] [--arch 80,90]`` prints one line per
variant and exits 1 if any fails, including a variant whose shared memory exceeds what the
architecture gives one block (a launch would fail with OutOfResources). Each variant is compiled
with the launch parameters its launcher uses (block sizes, warps, stages). Must run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import sys
import time

PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Shared memory one block may use (opt-in maximum), bytes: A100, H100.
SMEM_LIMIT = {80: 166912, 90: 232448}


def variants(full: bool):
    """(name, kernel, signature, constexprs, options) for each kernel configuration."""
    import torch

    from surgery.backends.triton import quant_matmul as qm
    from surgery.backends.triton import softmax as sx
    from surgery.backends.triton import softplus_attention as sa
    from surgery.backends.triton import stablemax as sm

    dtypes = ["fp32", "fp16", "bf16"] if full else ["fp16"]
    out = []
    for dt in dtypes:
        p = PTR[dt]
        for log in ([False, True] if full else [True]):
            row = {"x_ptr": p, "y_ptr": p, "n": "i32", "sx": "i32", "sy": "i32",
                   "LOG": "constexpr", "BLOCK": "constexpr"}
            for block in (4096, sm.MAX_FUSED):
                out.append((f"stablemax fused {dt} log={log} n={block}", sm._fwd_fused, row,
                            {"LOG": log, "BLOCK": block}, {"num_warps": sm._warps(block)}))
            two = dict(row, rows="i32", STAGES="constexpr")
            out.append((f"stablemax two-pass {dt} log={log}", sm._fwd_two_pass, two,
                        {"LOG": log, "BLOCK": sm.TILE, "STAGES": sm.TWO_PASS_STAGES},
                        {"num_warps": sm.TWO_PASS_WARPS}))
            bwd = {"x_ptr": p, "g_ptr": p, "dx_ptr": p, "n": "i32", "sx": "i32", "sg": "i32",
                   "sd": "i32", "LOG": "constexpr", "BLOCK": "constexpr"}
            out.append((f"stablemax bwd fused {dt} log={log}", sm._bwd_fused, bwd,
                        {"LOG": log, "BLOCK": 4096}, {"num_warps": sm._warps(4096)}))
            out.append((f"stablemax bwd two-pass {dt} log={log}", sm._bwd_two_pass, bwd,
                        {"LOG": log, "BLOCK": sm.TILE}, {"num_warps": sm._warps(sm.TILE)}))
        srow = {"x_ptr": p, "y_ptr": p, "n": "i32", "sx": "i32", "sy": "i32",
                "BLOCK": "constexpr"}
        out.append((f"softmax fused {dt}", sx._fused, srow, {"BLOCK": 4096}, {}))
        out.append((f"softmax online {dt}", sx._online, srow, {"BLOCK": 2048}, {}))
        out.append((f"softmax two-pass {dt}", sx._two_pass, srow, {"BLOCK": 2048}, {}))
        att = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "nvis_ptr": "*fp32",
               "km_ptr": "*i8", "nk_ptr": "*fp32"}
        att.update({n: "i32" for n in ("sq_b", "sq_h", "sq_m", "sk_b", "sk_h", "sk_n", "sv_b",
                                       "sv_h", "sv_n", "so_b", "so_h", "so_m", "skm_b",
                                       "snk_b", "snk_h", "H", "GROUP", "LQ", "LK")})
        att.update({"log_d": "fp32", "power": "fp32", "eps": "fp32"})
        consts = ("D", "DV", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N", "CAUSAL", "HAS_MASK",
                  "REWEIGHT", "FALLBACK", "POW_INT", "IEEE")
        att.update({c: "constexpr" for c in consts})
        heads = (64, 128, 256) if full else (64,)
        for reweight, d in ((r, d) for r in (False, True) for d in heads):
            bm, bn, warps, stages = sa.launch_config(d, getattr(torch, TORCH_DTYPE[dt]), reweight)
            for mask in ([False, True] if full and d == 64 else [reweight]):
                ce = dict(D=d, DV=d, BLOCK_D=d, BLOCK_DV=d, BLOCK_M=bm, BLOCK_N=bn,
                          CAUSAL=True, HAS_MASK=mask, REWEIGHT=reweight, FALLBACK=True,
                          POW_INT=15 if reweight else 0, IEEE=dt == "fp32")
                out.append((f"softplus attention {dt} d={d} reweight={reweight} mask={mask}",
                            sa._lssa_fwd, att, ce, {"num_warps": warps, "num_stages": stages}))
        q = {"x_ptr": p, "qw_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": p,
             "y_ptr": p}
        dims = ("N", "K", "G", "GROUP", "sx_m", "sq_n", "sy_m")
        g4 = dict(q, **{d: "i32" for d in dims}, SIGNED="constexpr", HAS_ZEROS="constexpr",
                  HAS_BIAS="constexpr", BLOCK_N="constexpr", BLOCK_B="constexpr")
        for sym in ([True, False] if full else [False]):
            out.append((f"int4 gemv bytes {dt} sym={sym}", qm._gemv_int4, g4,
                        dict(SIGNED=sym, HAS_ZEROS=not sym, HAS_BIAS=True, BLOCK_N=16,
                             BLOCK_B=128), {}))
        words = dict(q, **{d: "i32" for d in dims}, qw_ptr="*i32", BITS="constexpr",
                     SIGNED="constexpr", HAS_ZEROS="constexpr", HAS_BIAS="constexpr",
                     BLOCK_N="constexpr", BLOCK_W="constexpr")
        deq = {"qw_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "w_ptr": p,
               **{d: "i32" for d in ("N", "K", "G", "GROUP", "sq_n", "sw_n")},
               **{c: "constexpr" for c in ("BITS", "SIGNED", "HAS_ZEROS", "BLOCK_N", "BLOCK_W")}}
        for bits in ([4, 8] if full else [4]):
            for sym in ([True, False] if full else [False]):
                out.append((f"int{bits} gemv words {dt} sym={sym}", qm._gemv_words, words,
                            dict(BITS=bits, SIGNED=sym, HAS_ZEROS=not sym, HAS_BIAS=True,
                                 BLOCK_N=qm.GEMV_BLOCK_N,
                                 BLOCK_W=qm.GEMV_BLOCK_K[bits] * bits // 32),
                            {"num_warps": qm.GEMV_WARPS}))
            out.append((f"int{bits} dequant {dt}", qm._dequant_words, deq,
                        dict(BITS=bits, SIGNED=False, HAS_ZEROS=True, BLOCK_N=32, BLOCK_W=32),
                        {"num_warps": 4}))
        g8 = dict(q, **{d: "i32" for d in dims}, HAS_ZEROS="constexpr", HAS_BIAS="constexpr",
                  BLOCK_N="constexpr", BLOCK_K="constexpr")
        g8["qw_ptr"] = "*i8"
        out.append((f"int8 gemv bytes {dt}", qm._gemv_int8, g8,
                    dict(HAS_ZEROS=False, HAS_BIAS=False, BLOCK_N=16, BLOCK_K=256), {}))
        gm = dict(q, **{d: "i32" for d in ("M",) + dims}, BITS="constexpr", SIGNED="constexpr",
                  HAS_ZEROS="constexpr", HAS_BIAS="constexpr", IEEE="constexpr",
                  BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr")
        for bits in ([4, 8] if full else [4]):
            sig = dict(gm, qw_ptr="*u8")
            out.append((f"int{bits} gemm {dt}", qm._gemm, sig,
                        dict(BITS=bits, SIGNED=False, HAS_ZEROS=True, HAS_BIAS=True,
                             IEEE=dt == "fp32", BLOCK_M=32, BLOCK_N=64, BLOCK_K=64), {}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="every dtype and flag combination")
    ap.add_argument("--arch", default="80", help="comma-separated SM versions, e.g. 80,90")
    args = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        print("TRITON_INTERPRET=1 is set: kernels are interpreted, nothing to compile")
        return 2
    failed = 0
    for arch in (int(a) for a in args.arch.split(",")):
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, consts, options in variants(args.all):
            t0 = time.perf_counter()
            try:
                k = triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=target,
                                   options=options)
                smem = k.metadata.shared
                if smem > SMEM_LIMIT.get(arch, SMEM_LIMIT[80]):
                    raise RuntimeError(f"{smem} B of shared memory, over sm_{arch}'s "
                                       f"{SMEM_LIMIT.get(arch, SMEM_LIMIT[80])} B")
                status = f"ok   {len(k.asm['cubin'])} B cubin, {smem} B smem"
            except Exception as e:  # report every failure, not only the first
                failed += 1
                status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"sm_{arch} {name}: {status} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
