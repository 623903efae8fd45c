"""RTN quantisation, QuantLinear storage and the plan-time checks (fast, tiny models)."""

import copy

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from surgery.passapi import RunContext, State
from surgery.passes.quantize.formats import (ClipSearch, Format, dequantize_codes,
                                             fit_group_params, grouped, pack_int4, quantize_codes,
                                             unpack_int4)
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.passes.quantize.rtn import rtn_quantize
from surgery.progress import Progress
from surgery.registry import get_pass, module_type

RTN = get_pass("quantize", "rtn")


def ctx(model):
    return RunContext(model=model, models={}, data={}, progress=Progress())


def apply(model, paths, **kw):
    p = RTN(RTN.Params(**kw))
    mods = {path: model.get_submodule(path) for path in paths}
    return p.run(ctx(model), mods).report


@pytest.mark.parametrize("bits,sym,group", [(8, True, None), (8, False, 16), (4, True, 16),
                                            (4, False, 16), (4, False, None), (4, True, None)])
def test_error_at_most_half_a_step(bits, sym, group):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    fmt = Format(bits, sym)
    g = group or 64
    q, s, z = rtn_quantize(w, fmt, g)
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    w_hat = dequantize_codes(grouped(q, g), s, z).reshape(w.shape)
    step = s.abs().unsqueeze(-1).expand(-1, -1, g).reshape(w.shape)
    err = (w - w_hat).abs()
    # int4 symmetric (ORT flavour) may clip the side opposite the extreme by at most one step.
    clipped = (bits == 4 and sym) & ((q == fmt.qmax) | (q == fmt.qmin))
    assert torch.all(err[~clipped] <= step[~clipped] / 2 + 1e-6)
    assert torch.all(err <= step + 1e-6)


def test_int8_per_channel_spec_formula():
    w = torch.tensor([[0.5, -1.27, 0.01], [2.0, 0.0, -0.5]])
    q, s, z = rtn_quantize(w, Format(8, True), 3)
    assert z is None
    assert torch.allclose(s.squeeze(1), torch.tensor([1.27 / 127, 2.0 / 127]))
    assert q[0, 1] == -127 and q[1, 0] == 127 and q[1, 1] == 0


def test_asymmetric_spec_formula_and_zero_exact():
    w = torch.tensor([[0.3, -0.9, 0.0, 1.2]])
    q, s, z = rtn_quantize(w, Format(4, False), 4)
    assert torch.allclose(s, torch.tensor([[2.1 / 15]]))
    assert z.item() == round(0.9 / (2.1 / 15))
    assert q[0, 2] == z.item()  # 0 maps to the zero point exactly


def test_int4_symmetric_extreme_is_exact():
    w = torch.tensor([[0.2, -0.1, 0.8, -0.75]])
    q, s, z = rtn_quantize(w, Format(4, True), 4)
    assert s.item() == pytest.approx(0.8 / -8)
    assert q[0, 2] == -8
    assert (q[0, 2] * s).item() == pytest.approx(0.8)


def test_pack_unpack_roundtrip_and_layout():
    codes = torch.tensor([[1, 2, 3, 15, 7]])
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 3)
    assert packed.tolist() == [[0x21, 0xF3, 0x07]]  # element 2k low nibble, 2k+1 high nibble
    assert unpack_int4(packed, 5, signed=False).tolist() == codes.tolist()
    g = torch.Generator().manual_seed(1)
    signed = torch.randint(-8, 8, (7, 33), generator=g)
    assert torch.equal(unpack_int4(pack_int4(signed), 33, signed=True).long(), signed)


def test_clip_search_lowers_weight_mse():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    fmt = Format(4, False)
    errs = []
    for clip in (None, ClipSearch(20, 0.5)):
        q, s, z = rtn_quantize(w, fmt, 32, clip)
        deq = dequantize_codes(grouped(q, 32), s, z)
        errs.append((deq - grouped(w, 32)).pow(2).sum(-1))
    assert torch.all(errs[1] <= errs[0])  # ratio 1 is a candidate, so no group gets worse
    assert errs[1].sum() < 0.97 * errs[0].sum()


def test_forward_matches_dequantized_weight_and_keeps_bias():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    ref = copy.deepcopy(m)
    report = apply(m, ["0", "2"], format="int4", group=16)
    assert isinstance(m[0], QuantLinear) and isinstance(m[2], QuantLinear)
    assert m[0].qweight.dtype == torch.uint8 and m[0].qweight.shape == (32, 32)
    assert torch.equal(m[0].bias, ref[0].bias) and m[2].bias is None
    x = torch.randn(5, 64)
    h = torch.relu(x @ m[0].dequantized_weight().T + ref[0].bias)
    assert torch.allclose(m(x), h @ m[2].dequantized_weight().T, atol=1e-6)
    assert torch.equal(m(x), m(x))
    assert report.modules == 2 and report.metrics["bytes_after"] < report.metrics["bytes_before"]


def test_int8_stores_real_int8():
    m = nn.Sequential(nn.Linear(16, 4))
    apply(m, ["0"], format="int8")
    assert m[0].qweight.dtype == torch.int8 and m[0].scales.shape == (4, 1)
    assert m[0].zeros is None


def test_state_dict_roundtrip_rebuilds_exactly():
    torch.manual_seed(0)
    for kw in ({"format": "int4", "group": 8}, {"format": "int8", "symmetric": False}):
        m = nn.Sequential(nn.Linear(24, 6))
        apply(m, ["0"], **kw)
        q = m[0]
        cls = module_type("QuantLinear")
        r = cls.from_surgery_config(q.surgery_config())
        r.load_state_dict(q.state_dict())
        x = torch.randn(3, 24)
        assert torch.equal(r(x), q(x))
        assert {k: v.dtype for k, v in r.state_dict().items()} == \
               {k: v.dtype for k, v in q.state_dict().items()}


def test_masked_weights_stay_zero():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    mask = torch.rand(8, 32) > 0.5
    with torch.no_grad():
        lin.weight.mul_(mask)
    lin.register_buffer("weight_mask", mask)
    m = nn.Sequential(lin)
    for fmt, sym in (("int4", False), ("int4", True), ("int8", None)):
        mm = copy.deepcopy(m)
        apply(mm, ["0"], format=fmt, group=8, symmetric=sym, clip=True)
        assert torch.all(mm[0].dequantized_weight()[~mask] == 0)


def test_group_must_divide_in_features_plan_time():
    p = RTN(RTN.Params(format="int4", group=128))
    with torch.device("meta"):
        lin = nn.Linear(576, 64)
    reason = p.check_module("model.layers.0.mlp.up_proj", lin)
    assert reason.startswith("group 128 does not divide in_features 576")
    assert "64" in reason and "192" in reason
    assert p.check_module("x", nn.Linear(1536, 4, device="meta")) is None


def test_states_refuse_requantizing():
    assert RTN.produces == {State.QUANTIZED}
    assert RTN.refusals[State.QUANTIZED] == "already quantized"
    assert State.QUANTIZED not in RTN.accepts and State.MASKED in RTN.accepts
    m = nn.Sequential(nn.Linear(16, 4))
    apply(m, ["0"], format="int4")
    assert RTN(RTN.Params(format="int4")).check_module("0", m[0]) == "already quantized (int4)"
    assert RTN.is_default


@pytest.mark.parametrize("kw,msg", [({"format": "int9"}, "format"),
                                    ({"format": "int4", "group": 0}, "group must be at least 2"),
                                    ({"format": "int4", "clip_min": 1.5}, "clip_min"),
                                    ({"format": "int4", "grup": 64}, "grup")])
def test_bad_params_are_validation_errors(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        RTN.Params(**kw)


def test_backward_flows_to_input():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 4))
    apply(m, ["0"], format="int4", group=8)
    x = torch.randn(2, 16, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m[0].dequantized_weight().sum(0).expand(2, -1), atol=1e-6)
