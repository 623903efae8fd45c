"""Triton kernels against their plain-PyTorch references, in Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is imported (this module sets it at collection, before
any test runs). Shapes are small and irregular (rows not a power of two, lengths not a multiple of
the block, fully masked rows) because the interpreter is slow. Every kernel dtype is covered.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'surgery[triton]')")

from surgery.backends.ops import cross_entropy as ce  # noqa: E402
from surgery.backends.ops import quant as Q  # noqa: E402
from surgery.backends.ops import softplus_attention as spa  # noqa: E402
from surgery.backends.ops import stablemax as sm  # noqa: E402
from surgery.backends.triton import cross_entropy as cce  # noqa: E402
from surgery.backends.triton import quant_matmul, softmax, softplus_attention, stablemax  # noqa: E402
from surgery.backends.triton.common import interpreting  # noqa: E402

if not interpreting():  # pragma: no cover - only when another import won the race
    # Not silently lost: test_triton_isolated.py then runs this file in a fresh interpreter.
    pytest.skip("triton was imported before TRITON_INTERPRET=1; test_triton_isolated.py runs "
                "this file in a fresh interpreter", allow_module_level=True)

# the interpreter runs on numpy, which warns about the inf/NaN of masked lanes
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) of kernel vs reference, both rounded to the output dtype
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}


def _rows(dtype, shape=(5, 37), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    x[1] = float("-inf")  # a fully masked row
    x[2, ::3] = float("-inf")  # partly masked
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["one-pass", "two-pass"])
def test_stablemax_forward(dtype, log, fused):
    x = _rows(dtype)
    ref = (sm.log_stablemax_reference if log else sm.stablemax_reference)(x, -1)
    got = stablemax.stablemax_forward(x, -1, log, max_fused=64 if fused else 8, tile=16)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)
    if not log:  # masked lanes are exactly zero, the fully masked row is NaN like the reference
        assert (got[2, ::3] == 0).all() and torch.isnan(got[1]).all()


@pytest.mark.parametrize("log", [False, True])
def test_stablemax_two_pass_programs_walk_several_rows(log):
    # The persistent two-pass grid: 2 programs for 5 rows, each program walks rows 2 apart.
    x = _rows(torch.float32)
    ref = (sm.log_stablemax_reference if log else sm.stablemax_reference)(x, -1)
    got = stablemax.stablemax_forward(x, -1, log, max_fused=8, tile=16, programs=2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_stablemax_other_dim_and_golden():
    x = torch.tensor([[-1.0, 0.0, 2.0]]).T.contiguous()  # reduce over dim 0
    got = stablemax.stablemax_forward(x, 0)
    torch.testing.assert_close(got[:, 0], torch.tensor([0.5, 1.0, 3.0]) / 4.5, rtol=1e-6, atol=0)
    x = _rows(torch.float32, (3, 6, 5))
    torch.testing.assert_close(stablemax.stablemax_forward(x, 1, True, tile=4),
                               sm.log_stablemax_reference(x, 1), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["one-pass", "two-pass"])
def test_stablemax_backward(dtype, log, fused):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 23, generator=g) * 3).to(dtype)
    up = torch.randn(4, 23, generator=g).to(dtype)
    ref = sm.stablemax_backward_reference(x, up, -1, log)
    got = stablemax.stablemax_backward(x, up, -1, log, max_fused=64 if fused else 8, tile=16)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * 10)
    if dtype == torch.float32:  # the reference itself is autograd's gradient
        xx = x.clone().requires_grad_()
        (sm.log_stablemax_reference if log else sm.stablemax_reference)(xx, -1).backward(up)
        torch.testing.assert_close(got, xx.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["fused", "online", "two_pass"])
def test_softmax_kernels(dtype, algorithm):
    x = _rows(dtype, (5, 45), seed=4, scale=30.0)  # large logits: exercises the rescaling
    x[3, :20] = float("-inf")  # the first tiles of a row fully masked (online guard)
    ref = torch.softmax(x.float(), -1).to(dtype)
    got = softmax.softmax_forward(x, -1, algorithm, tile=16)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)
    if dtype == torch.float32:  # spec §10: equal to torch.softmax within 1e-6 rel
        ok = ~torch.isnan(ref)
        assert ((got[ok] - ref[ok]).abs() <= 1e-6 * ref[ok].abs() + 1e-12).all()


def _qkv(dtype, b=2, h=4, hkv=2, lq=19, lk=19, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


ATT_TOL = {torch.float32: (1e-4, 2e-5), torch.float16: (1e-2, 2e-3), torch.bfloat16: (5e-2, 2e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("power", [0.0, 15.0], ids=["lssa", "lssar"])
def test_softplus_attention_causal_gqa_padding(dtype, power):
    q, k, v = _qkv(dtype)
    key_mask = torch.ones(2, 19, dtype=torch.bool)
    key_mask[1, :5] = False  # left padding: queries 0..4 of batch 1 see nothing
    ref = spa.softplus_attention_reference(q, k, v, key_mask, True, power)
    got = softplus_attention.softplus_attention_forward(q, k, v, key_mask, True, power,
                                                        block_m=16, block_n=16)
    rtol, atol = ATT_TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    assert torch.equal(got[1, :, :5], torch.zeros_like(got[1, :, :5]))  # fully masked rows


@pytest.mark.parametrize("case", ["noncausal", "kv-cache", "lssar-p3-nofallback", "dv",
                                  "lssar-p2.5", "many-tiles", "many-tiles-lssar"])
def test_softplus_attention_variants(case):
    # "many-tiles": 70 queries in blocks of 16 over key tiles of 16: every query block past the
    # first has key tiles that skip the causal select (see _lssa_fwd) and a diagonal tile.
    n = 70 if case.startswith("many-tiles") else 21
    q, k, v = _qkv(torch.float32, b=1, lq=n, lk=n, d=20)
    kw = dict(causal=True, power=0.0)
    if case == "lssar-p2.5":  # a non-integer power takes exp2(p log2 r), not repeated squaring
        kw["power"] = 2.5
    elif case == "many-tiles-lssar":
        kw["power"] = 15.0
    if case == "noncausal":
        kw["causal"] = False
    elif case == "kv-cache":  # 3 new queries against 21 cached keys: bottom-right causal
        q = q[:, :, -3:]
        kw["power"] = 15.0
    elif case == "lssar-p3-nofallback":
        kw.update(power=3.0, fallback_on_empty=False)
    elif case == "dv":  # value head dim different from the query's
        v = torch.randn(1, 2, 21, 40, generator=torch.Generator().manual_seed(9))
    ref = spa.softplus_attention_reference(q, k, v, None, **kw)
    got = softplus_attention.softplus_attention_forward(q, k, v, None, **kw, block_m=16,
                                                        block_n=16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


def test_lssar_uniform_rows_fall_back_exactly():
    # identical keys make every LSSA row exactly uniform: x = N/N - 1 = 0 everywhere past row 3
    q, k, v = _qkv(torch.float32, b=1, h=2, hkv=2, lq=7, lk=7, d=16)
    k[:] = k[:, :, :1]
    for fallback in (True, False):
        ref = spa.softplus_attention_reference(q, k, v, None, True, 15.0, 1e-8, fallback)
        got = softplus_attention.softplus_attention_forward(q, k, v, None, True, 15.0, 1e-8,
                                                            fallback, block_m=16, block_n=16)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


def _quant_case(bits, sym, n=37, k=45, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = (torch.randint(-8, 8, (n, k), generator=g) if sym
                 else torch.randint(0, 16, (n, k), generator=g)).to(torch.int8)
        qw = Q.pack_int4(codes)
    else:
        codes = (torch.randint(-127, 128, (n, k), generator=g).to(torch.int8) if sym
                 else torch.randint(0, 256, (n, k), generator=g).to(torch.uint8))
        qw = codes
    scales = torch.rand(n, groups, generator=g) * 0.05 + 0.01
    zeros = None if sym else torch.randint(0, 2 ** bits, (n, groups), generator=g).to(torch.uint8)
    bias = torch.randn(n, generator=g)
    return qw, scales, zeros, bias


QTOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("rows", [1, 3, 21], ids=["gemv", "gemv3", "gemm"])
@pytest.mark.parametrize("k", [45, 96], ids=["bytes", "words"])
def test_quant_matmul(dtype, bits, sym, rows, k):
    # k=45 is odd (the last byte of every int4 row is half padding): the GEMV byte path; k=96 in
    # groups of 32 takes the int32-word GEMV path, with block_k=16 < K so it loops over words.
    qw, scales, zeros, bias = _quant_case(bits, sym, k=k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    b = bias.to(dtype)
    if bits == 4:
        ref = Q.int4_linear(x, qw, scales, zeros, b, k)
        got = quant_matmul.int4_linear(x, qw, scales, zeros, b, k, block_m=16, block_n=16,
                                       block_k=16)
    else:
        ref = Q.int8_linear(x, qw, scales, zeros, b)
        got = quant_matmul.int8_linear(x, qw, scales, zeros, b, block_m=16, block_n=16,
                                       block_k=16)
    rtol, atol = QTOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item())


def test_quant_matmul_per_channel_no_bias_3d_input():
    qw, scales, zeros, _ = _quant_case(4, False, n=20, k=33, groups=1)
    x = torch.randn(2, 3, 33, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(quant_matmul.int4_linear(x, qw, scales, zeros, None, 33,
                                                        block_n=16, block_k=16),
                               Q.int4_linear(x, qw, scales, zeros, None, 33), rtol=1e-5, atol=1e-5)


def test_reference_only_bypasses_the_kernels(monkeypatch):
    # The lowering gate's oracle: on a GPU the op's CUDA implementation is the kernel, so the
    # reference side of the comparison must not dispatch to it.
    from surgery.backends.triton import registry

    monkeypatch.setitem(registry.KERNELS, "stablemax", lambda x, dim: torch.zeros_like(x))
    x = _rows(torch.float32)
    assert torch.equal(registry.run("stablemax", x, -1), torch.zeros_like(x))
    with registry.reference_only():
        got = registry.run("stablemax", x, -1)
    torch.testing.assert_close(got, sm.stablemax_reference(x, -1), equal_nan=True)
    assert torch.equal(registry.run("stablemax", x, -1), torch.zeros_like(x))  # restored


@pytest.mark.parametrize("dtype", DTYPES)
def test_cut_cross_entropy_kernels(dtype):
    """Forward (online lse over vocabulary tiles) and backward (recomputed tiles, fp32 atomics)
    against the chunked reference, which test_cut_cross_entropy.py pins to F.cross_entropy.
    Sizes divide none of the tiles; some labels are ignored."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 40, 101
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / 4).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::6] = -100
    loss, lse = cce.forward(h, w, y, -100, None)
    ref_loss, ref_lse = ce.forward_reference(h, w, y, -100)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    assert (loss[::6] == 0).all()
    upstream = torch.rand(n, generator=g)
    dh, dw = cce.backward(h, w, y, lse, upstream, -100, None)
    ref_dh, ref_dw = ce.backward_reference(h, w, y, ref_lse, upstream, -100, None)
    assert dh.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(dh.float(), ref_dh.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dw.float(), ref_dw.float(), rtol=tol, atol=tol)


def test_cut_cross_entropy_backward_filters_tiles():
    """With a threshold above every |G|, every tile is skipped: the gradient is exactly zero."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(33, 32, generator=g), torch.randn(70, 32, generator=g) / 8
    y = torch.randint(0, 70, (33,), generator=g)
    loss, lse = cce.forward(h, w, y, -100, None)
    dh, dw = cce.backward(h, w, y, lse, torch.ones(33), -100, 2.0)
    assert (dh == 0).all() and (dw == 0).all()
