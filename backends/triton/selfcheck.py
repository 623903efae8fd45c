"""Check every Triton kernel against its reference on a CUDA GPU at realistic shapes.

``python -m surgery.backends.triton.selfcheck`` exits 0 when all kernels match, 1 on a mismatch
(printing which), and 0 with a note when there is no CUDA GPU. Run without TRITON_INTERPRET so the
kernels are compiled; tests/backends/test_triton_gpu.py runs it in a subprocess.
"""

from __future__ import annotations

import sys

import torch


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float,
           failures: list[str]) -> None:
    try:
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as e:
        failures.append(f"{name}: {str(e).splitlines()[0]}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 0
    import surgery.backends.triton  # noqa: F401 - registers the CUDA kernels
    from surgery.backends.ops import quant as Q
    from surgery.backends.ops import softplus_attention as spa
    from surgery.backends.ops import stablemax as sm

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4),
           torch.bfloat16: (1.6e-2, 1e-3)}
    failures: list[str] = []
    for dtype in tol:
        rtol, atol = tol[dtype]
        for n in (1000, 4096, 50_000):  # 50k takes the two-pass path
            x = (torch.randn(64, n, device=dev, generator=g) * 3).to(dtype)
            x[3] = float("-inf")
            up = torch.randn_like(x)
            _close(f"stablemax {dtype} n={n}", torch.ops.surgery.stablemax(x, -1),
                   sm.stablemax_reference(x, -1), rtol, atol, failures)
            _close(f"log_stablemax {dtype} n={n}", torch.ops.surgery.log_stablemax(x, -1),
                   sm.log_stablemax_reference(x, -1), rtol, atol, failures)
            xf = x.clone()
            xf[3] = 0
            for log in (False, True):
                _close(f"stablemax_backward log={log} {dtype} n={n}",
                       torch.ops.surgery.stablemax_backward(xf, up, -1, log),
                       sm.stablemax_backward_reference(xf, up, -1, log), rtol, atol * 10,
                       failures)
            for alg in ("fused", "online", "two_pass"):
                _close(f"softmax {alg} {dtype} n={n}", torch.ops.surgery.softmax(x, -1, alg),
                       torch.softmax(x.float(), -1).to(dtype), rtol, atol, failures)
        for power in (0.0, 15.0):
            q = torch.randn(2, 8, 777, 64, device=dev, generator=g).to(dtype)
            k = torch.randn(2, 2, 777, 64, device=dev, generator=g).to(dtype)
            v = torch.randn(2, 2, 777, 64, device=dev, generator=g).to(dtype)
            km = torch.ones(2, 777, dtype=torch.bool, device=dev)
            km[1, :100] = False
            att_tol = {torch.float32: (1e-4, 2e-5), torch.float16: (1e-2, 2e-3),
                       torch.bfloat16: (5e-2, 2e-2)}[dtype]
            _close(f"softplus_attention p={power} {dtype}",
                   torch.ops.surgery.softplus_attention(q, k, v, km, True, power, 1e-8, True),
                   spa.softplus_attention_reference(q, k, v, km, True, power), *att_tol, failures)
        for bits in (4, 8):
            n_out, k_in, group = 1000, 4096, 128
            if bits == 4:
                codes = torch.randint(0, 16, (n_out, k_in), device=dev, generator=g)
                qw = Q.pack_int4(codes.to(torch.int8))
            else:
                qw = torch.randint(0, 256, (n_out, k_in), device=dev, generator=g).to(torch.uint8)
            s = torch.rand(n_out, k_in // group, device=dev, generator=g) * 0.01
            z = torch.randint(0, 2 ** bits, (n_out, k_in // group), device=dev,
                              generator=g).to(torch.uint8)
            for rows in (1, 300):
                x = torch.randn(rows, k_in, device=dev, generator=g).to(dtype)
                if bits == 4:
                    got = torch.ops.surgery.int4_linear(x, qw, s, z, None, k_in)
                    ref = Q._linear(x, Q.dequantize_int4(qw, s, z, k_in), None)
                else:
                    got = torch.ops.surgery.int8_linear(x, qw, s, z, None)
                    ref = Q._linear(x, Q.dequantize(qw, s, z), None)
                scale = ref.abs().max().item()
                _close(f"int{bits}_linear rows={rows} {dtype}", got, ref, rtol, atol * 10 * scale,
                       failures)
    for dtype, d in ((torch.float16, 128), (torch.bfloat16, 256), (torch.float32, 128)):
        # wide heads take smaller tiles (launch_config): check they compile and agree
        q, k, v = (torch.randn(1, 4, 300, d, device=dev, generator=g).to(dtype) for _ in range(3))
        att_tol = {torch.float32: (1e-4, 2e-5), torch.float16: (1e-2, 2e-3),
                   torch.bfloat16: (5e-2, 2e-2)}[dtype]
        for power in (0.0, 15.0):
            _close(f"softplus_attention p={power} {dtype} d={d}",
                   torch.ops.surgery.softplus_attention(q, k, v, None, True, power, 1e-8, True),
                   spa.softplus_attention_reference(q, k, v, None, True, power), *att_tol,
                   failures)
    for f in failures:
        print("MISMATCH", f)
    print(f"{'FAILED' if failures else 'ok'}: Triton kernels on {torch.cuda.get_device_name()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
