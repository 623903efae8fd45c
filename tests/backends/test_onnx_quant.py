"""ONNX export of quantized models: MatMulNBits and QDQ graphs, ORT equivalence, the pass."""

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.backends.onnx import export_onnx, ort_session
from surgery.backends.onnx.quant_layout import DQMatMulLinear, MatMulNBitsLinear
from surgery.data import Dataset
from surgery.passapi import PassError, RunContext
from surgery.passes.quantize.formats import Format
from surgery.passes.quantize.gptq import gptq_quantize
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.passes.quantize.rtn import rtn_quantize
from surgery.progress import Progress
from surgery.registry import get_pass

RTN = get_pass("quantize", "rtn")
GPTQ = get_pass("quantize", "gptq")
EXPORT = get_pass("export", "onnx")


def qlinear(bits, sym, group, k=64, n=24, bias=True, act_order=False):
    torch.manual_seed(0)
    W = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    if act_order:
        X = torch.randn(256, k) * torch.linspace(0.1, 3, k)
        r = gptq_quantize(W, 2 / 256 * X.T @ X, Format(bits, sym), group, act_order=True)
        return QuantLinear.from_codes(r.codes, r.scales, r.zeros, bits=bits, bias=b, perm=r.perm)
    q, s, z = rtn_quantize(W, Format(bits, sym), group or k)
    return QuantLinear.from_codes(q, s, z, bits=bits, bias=b)


def initializer_types(path):
    m = onnx.load(str(path))
    inits = {i.name: i.data_type for i in m.graph.initializer}
    return m, inits


CASES = [(4, False, 16), (4, True, 32), (4, False, None), (4, True, None), (8, True, None),
         (8, False, 16), (2, False, 16), (2, True, 32), (3, False, 16), (3, True, None),
         (5, True, 32), (6, False, None), (7, False, 16)]
# Each export takes seconds; the default run covers every storage kind once, -m slow all pairs.
FAST = {((4, False, 16), "matmulnbits"), ((4, True, 32), "qdq"), ((4, False, None), "qdq"),
        ((8, False, 16), "qdq"), ((2, False, 16), "matmulnbits"), ((2, True, 32), "matmulnbits"),
        ((3, False, 16), "matmulnbits"), ((3, True, None), "qdq"), ((5, True, 32), "matmulnbits"),
        ((6, False, None), "qdq"), ((7, False, 16), "matmulnbits")}
PAIRS = [pytest.param(c, i, marks=() if (c, i) in FAST else pytest.mark.slow)
         for c in CASES for i in ("matmulnbits", "qdq")]


@pytest.mark.parametrize("bits,sym,group", CASES)
def test_export_layouts_equal_quantlinear(bits, sym, group):
    q = qlinear(bits, sym, group)
    x = torch.randn(3, 64)
    ref = x @ q.dequantized_weight().T + q.bias
    torch.testing.assert_close(DQMatMulLinear(q)(x), ref, rtol=1e-5, atol=1e-5)
    if bits in (2, 4):
        torch.testing.assert_close(MatMulNBitsLinear(q)(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,int4", PAIRS)
def test_single_layer_graph_reproduces_x_w_hat(tmp_path, case, int4):
    bits, sym, group = case
    q = qlinear(bits, sym, group)
    path = tmp_path / "l.onnx"
    rep = export_onnx(nn.Sequential(q), path, example=torch.randn(2, 64), int4=int4)
    assert rep.verified and rep.max_rel_diff < 1e-5
    m, inits = initializer_types(path)
    ops = {(n.domain, n.op_type) for n in m.graph.node}
    if bits in (2, 4) and int4 == "matmulnbits":
        assert ops == {("com.microsoft", "MatMulNBits")}
        node = m.graph.node[0]
        assert inits[node.input[1]] == onnx.TensorProto.UINT8
        assert next(a.i for a in node.attribute if a.name == "bits") == bits
    else:
        assert ("", "DequantizeLinear") in ops and ("", "MatMul") in ops
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
        # int4 in real INT4/UINT4; the other widths (no ORT MatMulNBits for 3, 5, 6, 7) in the
        # int8 / uint8 container holding exactly the codes
        want = ({True: onnx.TensorProto.INT4, False: onnx.TensorProto.UINT4} if bits == 4 else
                {True: onnx.TensorProto.INT8, False: onnx.TensorProto.UINT8})[sym]
        assert inits[dq.input[0]] == want
        assert len(dq.input) == (2 if sym else 3)
    # a fresh input through ORT equals x @ w_hat.T + b
    x = torch.randn(5, 64)
    sess = ort_session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, (x @ q.dequantized_weight().T + q.bias).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_act_order_layer_exports_with_gather(tmp_path):
    q = qlinear(4, False, 16, act_order=True)
    assert q.perm is not None
    for int4 in ("matmulnbits", "qdq"):
        rep = export_onnx(nn.Sequential(q), tmp_path / f"{int4}.onnx",
                          example=torch.randn(2, 64), int4=int4)
        assert rep.verified and rep.op_counts.get("Gather") == 1


def test_matmulnbits_needs_a_power_of_two_block(tmp_path):
    q = qlinear(4, False, 24, k=72)
    with pytest.raises(PassError, match="power-of-two block"):
        export_onnx(nn.Sequential(q), tmp_path / "x.onnx", example=torch.randn(1, 72))
    assert export_onnx(nn.Sequential(q), tmp_path / "x.onnx", example=torch.randn(1, 72),
                       int4="qdq").verified


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def quantize(model, method, **kw):
    g = torch.Generator().manual_seed(0)
    ds = Dataset("calib", torch.randint(0, 256, (8, 32), generator=g),
                 torch.randint(0, 256, (2, 32), generator=g))
    mods = {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers")}
    P = get_pass("quantize", method)
    P(P.Params(**kw)).run(RunContext(model=model, models={}, data={"calib": ds},
                                       progress=Progress()), mods)
    return model


@pytest.mark.parametrize("int4", ["matmulnbits", pytest.param("qdq", marks=pytest.mark.slow)])
def test_tiny_llama_export_matches_pytorch(tmp_path, int4):
    model = quantize(tiny_llama(), "gptq", format="int4", group=16, data="calib",
                     act_order=True)
    layer = model.model.layers[1].mlp.up_proj
    path = tmp_path / "m.onnx"
    ctx = RunContext(model=model, models={}, data={}, progress=Progress())
    report = EXPORT(EXPORT.Params(path=str(path), int4=int4)).run(ctx, {}).report
    assert report.metrics["verified"] and report.metrics["max_rel_diff"] <= 1e-3
    assert report.metrics["dynamic_axes"]
    key = "com.microsoft::MatMulNBits" if int4 == "matmulnbits" else "DequantizeLinear"
    assert report.metrics["ops"][key] == 14
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)  # restored after export
    assert model.model.layers[1].mlp.up_proj is layer
    # dynamic axes: another batch size and length
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(3))
    sess = ort_session(path)
    out = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-3


@pytest.mark.slow
def test_int8_llama_export_and_failed_verification_leaves_nothing(tmp_path):
    model = quantize(tiny_llama(), "rtn", format="int8")
    path = tmp_path / "m.onnx"
    ctx = RunContext(model=model, models={}, data={}, progress=Progress())
    with pytest.raises(PassError, match="differs from PyTorch"):
        EXPORT(EXPORT.Params(path=str(path), tolerance=1e-12)).run(ctx, {})
    assert not path.exists() and list(tmp_path.iterdir()) == []
    report = EXPORT(EXPORT.Params(path=str(path))).run(ctx, {}).report
    assert report.metrics["verified"] and path.exists()
    assert report.metrics["ops"]["DequantizeLinear"] == 14


def test_export_params_validation():
    with pytest.raises(ValidationError, match="opset must be between 21 and 23"):
        EXPORT.Params(path="x.onnx", opset=17)
    with pytest.raises(ValidationError, match="accuracy_level"):
        EXPORT.Params(path="x.onnx", accuracy_level=7)
    with pytest.raises(ValidationError, match="int4"):
        EXPORT.Params(path="x.onnx", int4="nbits")
