"""QuantLinear's packed CPU kernels (backends/ops/quant_cpu.py) against the dequantise reference.

fp32 activations: the aten kernels compute the stored format's formula in fp32, so they agree
with the reference to fp32 accumulation order (asserted at 1e-5 relative; forward does not use
them by default because their x86 loop is scalar, so these tests enable them). bf16 activations:
the kernels round the scales (and the int4 zero term) to bf16, accumulate in fp32 and round the
output to bf16; every output is checked against the per-element bound that implies
(docs/passes/quantize.md, "Packed CPU kernels"), and a wrong mapping is shown to break it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from surgery.backends.ops import quant_cpu
from surgery.passes.quantize.formats import Format
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.passes.quantize.rtn import rtn_quantize

U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits, round to nearest even)
U_FP32 = 2.0 ** -24


def make_layer(bits, symmetric, group, k, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    codes, scales, zeros = rtn_quantize(w, Format(bits, symmetric), group or k)
    return QuantLinear.from_codes(codes, scales, zeros, bits=bits, bias=b)


def reference(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    m.fast_path = False
    try:
        return m(x)
    finally:
        del m.fast_path  # back to the class default


@pytest.fixture
def fp32_kernels(monkeypatch):
    """Let forward use the fp32 kernels at one row (off by default: not faster on x86)."""
    monkeypatch.setitem(quant_cpu.MAX_ROWS, torch.float32, {8: 1, 4: 1})


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# every int4 kernel group (32..256), a per-channel layer (K=512 -> kernel group 256, params
# repeated) and a group that is a multiple of a kernel group (96 -> 32)
INT4_CASES = [(32, 256, 64), (64, 576, 192), (128, 256, 48), (256, 512, 32), (None, 512, 32),
              (96, 192, 32)]


@pytest.mark.parametrize("rows", [1])
def test_int8_fp32_kernel_within_1e5_of_reference(rows, fp32_kernels):
    m = make_layer(8, True, None, 576, 192)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, r = m(x), reference(m, x)
    assert m._packed[torch.float32][1] is not None  # the kernel ran
    assert not torch.equal(y, r)  # a different accumulation order, not the reference again
    assert rel_err(y, r) <= 1e-5


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group,k,n", INT4_CASES)
def test_int4_fp32_kernel_within_1e5_of_reference(group, k, n, symmetric, fp32_kernels):
    m = make_layer(4, symmetric, group, k, n)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, r = m(x), reference(m, x)
    assert m._packed[torch.float32][1] is not None
    assert rel_err(y, r) <= 1e-5


def bf16_bound(m: QuantLinear, xb: torch.Tensor):
    """Exact result (float64) of the stored format on bf16 inputs, and the kernel's error bound.

    Kernel weight w~ = q*bf16(s) (int8) or fma(q - 8, bf16(s), bf16((8 - z) s)) (int4), so
    |w~ - w| <= u * d with d = |w| (int8, symmetric int4) or (|q - 8| + |8 - z|) |s| (asymmetric
    int4); fp32 accumulation over K adds <= K u32 sum|x||w| (x2 for the products' roundings),
    and the bf16 output rounding u |y|. The 1.01 absorbs second-order terms.
    """
    w = m.dequantized_weight().double()
    x = xb.double()
    exact = x @ w.T
    if m.bits == 8 or m.symmetric:
        d = w.abs()
    else:
        q = m.codes().double()
        z = m.zeros.double().repeat_interleave(m.group, 1)
        s = m.scales.double().abs().repeat_interleave(m.group, 1)
        d = ((q - 8).abs() + (8 - z).abs()) * s
    k = m.in_features
    bound = U_BF16 * exact.abs() + 1.01 * (U_BF16 * (x.abs() @ d.T)
                                           + 2 * k * U_FP32 * (x.abs() @ w.abs().T))
    return exact, bound


def packed_no_bias(m, xb):
    return quant_cpu.packed_linear(xb, m.prepare(torch.bfloat16), None)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int8_bf16_kernel_within_stated_bound(rows):
    m = make_layer(8, True, None, 576, 192)
    xb = torch.randn(rows, 576, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = packed_no_bias(m, xb)
    assert y.dtype == torch.bfloat16
    exact, bound = bf16_bound(m, xb)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group,k,n", INT4_CASES)
@pytest.mark.parametrize("rows", [1, 7])
def test_int4_bf16_kernel_within_stated_bound(group, k, n, symmetric, rows):
    m = make_layer(4, symmetric, group, k, n)
    xb = torch.randn(rows, k, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = packed_no_bias(m, xb)
    exact, bound = bf16_bound(m, xb)
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound).max())


def test_bound_catches_a_wrong_zero_point_mapping():
    # Packing asymmetric codes with the symmetric mapping (no zero term) must violate the bound:
    # the bound is tight enough to pin the layout, not just "roughly right".
    m = make_layer(4, False, 64, 256, 64)
    xb = torch.randn(3, 256, generator=torch.Generator().manual_seed(5)).bfloat16()
    wrong = quant_cpu.pack_int4(m.qweight, m.scales, None, m.in_features, m.group, torch.bfloat16)
    exact, bound = bf16_bound(m, xb)
    y = quant_cpu.packed_linear(xb, wrong, None)
    assert ((y.double() - exact).abs() > bound).any()


def test_bf16_forward_with_bias_close_to_reference():
    m = make_layer(4, False, 64, 576, 192)
    xb = torch.randn(1, 576, generator=torch.Generator().manual_seed(6)).bfloat16()
    with torch.no_grad():
        y, r = m(xb), reference(m, xb)
    assert m._packed[torch.bfloat16][1] is not None
    assert y.dtype == r.dtype == torch.bfloat16
    assert rel_err(y, r) <= 4 * U_BF16  # both are bf16 results of the same weights


# --- fallbacks -------------------------------------------------------------------------------

FALLBACKS = [
    (dict(bits=8, symmetric=False, group=None, k=64, n=32), torch.bfloat16, "zero points"),
    (dict(bits=8, symmetric=True, group=32, k=64, n=32), torch.bfloat16, "grouped int8"),
    (dict(bits=8, symmetric=True, group=None, k=40, n=32), torch.bfloat16, "multiple of 16"),
    (dict(bits=4, symmetric=False, group=16, k=64, n=32), torch.bfloat16, "group 16"),
    (dict(bits=4, symmetric=False, group=48, k=96, n=32), torch.bfloat16, "group 48"),
    (dict(bits=4, symmetric=True, group=32, k=64, n=40), torch.bfloat16, "out_features 40"),
    (dict(bits=4, symmetric=False, group=32, k=64, n=32), torch.float16, "float16"),
]


@pytest.mark.parametrize("spec,dtype,why", FALLBACKS, ids=[f[2] for f in FALLBACKS])
def test_unsupported_layers_fall_back_to_the_reference(spec, dtype, why):
    m = make_layer(spec["bits"], spec["symmetric"], spec["group"], spec["k"], spec["n"])
    assert why in m.fast_path_reason(dtype)
    x = torch.randn(1, spec["k"], generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        y = m(x)
    assert torch.equal(y, reference(m, x))  # bit for bit: the reference ran
    assert m._packed.get(dtype, (None, None))[1] is None


def test_many_rows_and_autograd_take_the_reference(monkeypatch):
    m = make_layer(4, False, 64, 256, 64)
    calls = []
    monkeypatch.setattr(quant_cpu, "packed_linear", lambda *a: calls.append(a))
    rows = quant_cpu.MAX_ROWS[torch.bfloat16][4] + 1
    xb = torch.randn(rows, 256).bfloat16()
    with torch.no_grad():
        assert torch.equal(m(xb), reference(m, xb))
    x = torch.randn(1, 256, requires_grad=True)
    m(x).sum().backward()  # the kernels have no backward: the custom op's autograd runs
    torch.testing.assert_close(x.grad[0], m.dequantized_weight().sum(0), rtol=1e-5, atol=1e-6)
    assert calls == []


# --- preparation: once, never saved, rebuilt when the buffers change --------------------------

def test_packed_once_not_saved_and_rebuilt_on_load(monkeypatch):
    m = make_layer(4, False, 64, 256, 64)
    keys = set(m.state_dict())
    packs = []
    real = quant_cpu.pack
    monkeypatch.setattr(quant_cpu, "pack", lambda *a: packs.append(a) or real(*a))
    xb = torch.randn(1, 256).bfloat16()
    with torch.no_grad():
        for _ in range(3):
            m(xb)
    assert len(packs) == 1
    assert set(m.state_dict()) == keys  # the packed layout is not state
    other = make_layer(4, False, 64, 256, 64, seed=9)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        y = m(xb)
    assert len(packs) == 2  # rebuilt from the loaded codes
    torch.testing.assert_close(y, packed_no_bias(other, xb) + other.bias.bfloat16())
    c = copy.deepcopy(m)
    assert c._packed == {}
    m.to(torch.float64)
    assert m._packed == {}


@pytest.mark.parametrize("fmt", ["int8", "int4 using rtn(group=32)"])
def test_surgery_load_of_a_saved_artifact_uses_the_kernels(tiny_hf_dir, tmp_path, fmt,
                                                            fp32_kernels):
    import surgery

    out = tmp_path / "out"
    text = (f'model base = "hf:{tiny_hf_dir}"\n'
            f'quantize type(Linear) - modules("lm_head") to {fmt}\n'
            f'save "{out}"\n')
    res = surgery.apply(None, text)
    loaded = surgery.load(out)
    ids = torch.tensor([[5, 17, 33]])
    with torch.no_grad():
        ref_logits = res.model(ids).logits  # 3 rows: the reference path
        out_cache = loaded(ids, use_cache=True)
        nxt = out_cache.logits[:, -1:].argmax(-1)
        step = loaded(nxt, past_key_values=out_cache.past_key_values).logits  # 1 row: kernels
        full = res.model(torch.cat([ids, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(out_cache.logits, ref_logits, rtol=0, atol=0)
    qls = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(m._packed[torch.float32][1] is not None for m in qls)
    assert rel_err(step, full) <= 1e-5  # decode-step logits vs the dequantise reference
    bf = loaded.to(torch.bfloat16)  # the fast configuration: bf16 kernels at decode
    with torch.no_grad():
        bf(nxt.new_tensor([[7]]))
    assert all(m._packed[torch.bfloat16][1] is not None for m in qls)


def test_torch_compile_uses_prepared_kernels():
    m = make_layer(4, False, 64, 256, 64)
    xb = torch.randn(1, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    m.prepare(torch.bfloat16)
    with torch.no_grad():
        eager = m(xb)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(xb)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# --- the reference's unpack / dequantise: exact formulas ---------------------------------------

@pytest.mark.parametrize("signed", [False, True])
def test_unpack_and_dequantize_match_the_format_formulas(signed):
    from surgery.backends.ops.quant import dequantize, pack_int4, unpack_int4

    g = torch.Generator().manual_seed(10)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (6, 13), generator=g)  # odd width: padded nibble
    got = unpack_int4(pack_int4(codes), 13, signed)
    assert got.dtype == torch.int8 and torch.equal(got.long(), codes)
    q = torch.randint(0, 16, (4, 12), generator=g, dtype=torch.uint8)
    s, z = torch.rand(4, 3, generator=g), torch.randint(0, 16, (4, 3), generator=g,
                                                        dtype=torch.uint8)
    want = torch.stack([(q[:, 4 * j:4 * j + 4].float() - z[:, j:j + 1].float()) * s[:, j:j + 1]
                        for j in range(3)], 1).reshape(4, 12)
    assert torch.equal(dequantize(q, s, z), want)
    qf = q.float()
    dequantize(qf, s, None)
    assert torch.equal(qf, q.float())  # never writes into float codes


def test_fp32_forward_keeps_the_reference_by_default():
    m = make_layer(8, True, None, 64, 32)
    assert "MAX_ROWS 0" in m.fast_path_reason(torch.float32)
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.equal(m(x), reference(m, x))


def test_act_order_permutation_goes_through_the_kernel():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 128, generator=g) * 0.05
    perm = torch.randperm(128, generator=g)
    codes, scales, zeros = rtn_quantize(w[:, perm], Format(4, False), 32)  # stored permuted
    m = QuantLinear.from_codes(codes, scales, zeros, bits=4, perm=perm)
    xb = torch.randn(2, 128, generator=g).bfloat16()
    with torch.no_grad():
        y, r = m(xb), reference(m, xb)
    assert m._packed[torch.bfloat16][1] is not None
    exact = xb.double() @ m.dequantized_weight().double().T
    assert rel_err(y, exact) <= 4 * U_BF16 and rel_err(r, exact) <= 4 * U_BF16


def test_layers_built_under_inference_mode_use_the_kernels():
    with torch.inference_mode():
        m = make_layer(4, False, 64, 256, 64)
        xb = torch.randn(1, 256).bfloat16()
        y = m(xb)
    assert m._packed[torch.bfloat16][1] is not None
    torch.testing.assert_close(y, packed_no_bias(m, xb) + m.bias.bfloat16())
