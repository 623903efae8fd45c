"""ONNX translations of the kernel ops: StableMax, log-StableMax, softmax, softplus attention.

Standard ONNX ops only (opset 21), so ONNX Runtime or any other runtime runs them. Math in
float32 like the references (backends/ops/), cast back to the input type at the end. The int4 /
int8 linear ops are exported by the quantization layouts (MatMulNBits or DequantizeLinear +
MatMul, translations.py).

Softplus attention follows spec ops.md §2.4: ReduceL2 norms, MatMul, a ``log D * log N_i`` column,
Softplus, a Where mask built from Range (causal, bottom-right aligned) and the key mask, ReduceSum,
Div; LSSAR adds Relu, ReduceMax and Pow. Grouped-query heads are handled by a 5-D broadcast
(B, Hkv, H/Hkv, L, D) instead of repeating keys and values.
"""

from __future__ import annotations

import math

import torch
from onnxscript import ir
from onnxscript import opset21 as op

from surgery.backends.ops import softmax as _softmax  # noqa: F401 - defines the ops
from surgery.backends.ops import softplus_attention as _spa  # noqa: F401
from surgery.backends.ops import stablemax as _stablemax  # noqa: F401

FLOAT = ir.DataType.FLOAT


def _const(value: float):
    return op.Constant(value_float=float(value))


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _s_map(x):
    """s(x) and log s(x) (spec §1.1), x float32."""
    one = _const(1.0)
    neg = op.Less(x, _const(0.0))
    s = op.Where(neg, op.Reciprocal(op.Sub(one, x)), op.Add(x, one))
    log_s = op.Where(neg, op.Neg(op.Log(op.Sub(one, x))), op.Log(op.Add(x, one)))
    return s, log_s


def stablemax(x, dim: int):
    xf = op.Cast(x, to=FLOAT)
    s, _ = _s_map(xf)
    y = op.Div(s, op.ReduceSum(s, _ints(dim), keepdims=1))
    return op.CastLike(y, x)


def log_stablemax(x, dim: int):
    xf = op.Cast(x, to=FLOAT)
    s, log_s = _s_map(xf)
    y = op.Sub(log_s, op.Log(op.ReduceSum(s, _ints(dim), keepdims=1)))
    return op.CastLike(y, x)


def softmax(x, dim: int, algorithm: str):
    # the algorithm only picks a GPU kernel; every one computes softmax
    return op.CastLike(op.Softmax(op.Cast(x, to=FLOAT), axis=dim), x)


def _static(value, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"softplus attention export needs a static {what} (got {dim!r})")
    return dim


def softplus_attention(q, k, v, key_mask, causal: bool, power: float, eps: float,
                       fallback_on_empty: bool):
    heads = _static(q, 1, "number of query heads")
    kv_heads = _static(k, 1, "number of key/value heads")
    d = _static(q, 3, "head dim")
    dv = _static(v, 3, "value head dim")
    group = heads // kv_heads
    qf, kf, vf = (op.Cast(t, to=FLOAT) for t in (q, k, v))
    tiny = _const(1e-12)
    qn = op.Div(qf, op.Max(op.ReduceL2(qf, _ints(-1), keepdims=1), tiny))
    kn = op.Div(kf, op.Max(op.ReduceL2(kf, _ints(-1), keepdims=1), tiny))
    q5 = op.Reshape(qn, _ints(0, kv_heads, group, -1, d))  # (B, Hkv, G, Lq, D)
    k5 = op.Unsqueeze(kn, _ints(2))  # (B, Hkv, 1, Lk, D)
    v5 = op.Unsqueeze(vf, _ints(2))
    cos = op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3]))  # (B, Hkv, G, Lq, Lk)

    # visibility (Lq, Lk) [& key mask (B, 1, 1, 1, Lk)]
    lq = op.Squeeze(op.Shape(q, start=2, end=3))
    lk = op.Squeeze(op.Shape(k, start=2, end=3))
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(zero_i, lq, one_i), _ints(1))  # (Lq, 1)
    cols = op.Unsqueeze(op.Range(zero_i, lk, one_i), _ints(0))  # (1, Lk)
    if causal:
        vis = op.LessOrEqual(cols, op.Add(rows, op.Sub(lk, lq)))
    else:
        vis = op.GreaterOrEqual(op.Add(cols, op.Mul(rows, zero_i)), zero_i)  # all true
    if key_mask is not None:
        km = op.Reshape(op.Cast(key_mask, to=ir.DataType.BOOL), _ints(0, 1, 1, 1, -1))
        vis = op.And(vis, km)
    n = op.ReduceSum(op.Cast(vis, to=FLOAT), _ints(-1), keepdims=1)
    scale = op.Mul(_const(math.log(d)), op.Log(op.Max(n, _const(1.0))))
    z = op.Mul(scale, cos)
    zero = _const(0.0)
    a = op.Where(vis, op.Softplus(z), zero)
    # Sum, not Add: onnxscript's optimizer drops "Add(x, c)" when c is within 1e-8 of 0
    attn = op.Div(a, op.Sum(op.ReduceSum(a, _ints(-1), keepdims=1), _const(eps)))
    if power > 0:
        offset = op.Cast(op.Greater(n, _const(3.0)), to=FLOAT)
        x = op.Relu(op.Where(vis, op.Sub(op.Mul(n, attn), offset), zero))
        m = op.ReduceMax(x, _ints(-1), keepdims=1)
        fmin = _const(torch.finfo(torch.float32).tiny)
        r = op.Pow(op.Div(x, op.Max(m, fmin)), _const(power))
        r = op.Div(r, op.Max(op.ReduceSum(r, _ints(-1), keepdims=1), fmin))
        empty = op.LessOrEqual(m, zero)
        attn = op.Where(empty, attn if fallback_on_empty else op.Mul(attn, zero), r)
    out = op.MatMul(attn, v5)  # (B, Hkv, G, Lq, Dv)
    out = op.Reshape(out, _ints(0, heads, -1, dv))
    return op.CastLike(out, q)
