"""Translations of our custom ops into ONNX, and the hooks others use to add their own.

Two registries, both read by :func:`surgery.backends.onnx.export_onnx`:

- ``register_translation(op)``: decorator for an onnxscript function translating a
  ``torch.ops.surgery.*`` op overload (it becomes an entry of ``custom_translation_table`` of
  ``torch.onnx.export(dynamo=True)``)::

      from onnxscript import opset21 as op
      from surgery.backends.onnx.translations import register_translation

      @register_translation(torch.ops.surgery.stablemax.default)
      def stablemax(x, dim: int):
          ...  # build the result with onnxscript ops (op.Relu, op.Div ...)

  The function receives the op's arguments in order (tensors as graph values, ints/floats as
  Python values, absent optional tensors as None).
- ``register_export_module(cls)``: decorator for ``fn(module, options) -> nn.Module`` that swaps
  a module type for an export-time equivalent before tracing (on a copy of the model);
  ``options`` is the :class:`ExportOptions` of the export.

The translations of the ``surgery::`` kernel ops are named by their op records
(backends/ops/*, ``Op.onnx``) and registered here. A pass family's own layer type says how it
exports with a method instead (``surgery_export_module(options)``, e.g. QuantLinear), so no
backend imports a pass family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
import onnxscript
import torch
from onnxscript import ir
from onnxscript import opset21 as op

from surgery.backends.onnx import quant_layout  # noqa: F401  (defines the export ops)
from surgery.backends.ops.registry import Lazy, all_ops

TRANSLATIONS: dict[object, Callable] = {}
EXPORT_MODULES: dict[type, Callable] = {}



def _register_matmulnbits_schema() -> None:
    """onnx has no schema for ORT's contrib op; register one so onnxscript can build the node."""
    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    S = onnx.defs.OpSchema
    P = S.FormalParameter
    opt = S.FormalParameterOption.Optional
    A = S.AttrType
    schema = S(
        "MatMulNBits", "com.microsoft", 1,
        doc="ONNX Runtime weight-only n-bit MatMul: Y = A @ dequant(B)^T + bias",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"),
                P("zero_points", "T3", param_option=opt), P("g_idx", "T4", param_option=opt),
                P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
            ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)",
                    "tensor(bfloat16)"], "zero points"),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[S.Attribute("K", A.INT, "input features", required=True),
                    S.Attribute("N", A.INT, "output features", required=True),
                    S.Attribute("bits", A.INT, "bits per weight", required=True),
                    S.Attribute("block_size", A.INT, "quantisation block", required=True),
                    S.Attribute("accuracy_level", A.INT, "minimum compute precision",
                                required=False)],
    )
    onnx.defs.register_schema(schema)


_register_matmulnbits_schema()
msft = onnxscript.values.Opset("com.microsoft", 1)


@dataclass(frozen=True)
class ExportOptions:
    int4: str = "matmulnbits"  # "matmulnbits" | "qdq"
    accuracy_level: int = 0
    opset: int = 21


def register_translation(op_overload) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        TRANSLATIONS[op_overload] = fn
        return fn
    return deco


def register_export_module(cls: type) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        EXPORT_MODULES[cls] = fn
        return fn
    return deco


@register_translation(torch.ops.surgery.matmul_nbits.default)
def _matmul_nbits(A, B, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int,
                  accuracy_level: int):
    return msft.MatMulNBits(A, B, scales, zero_points, None, bias, K=K, N=N, bits=bits,
                            block_size=block_size, accuracy_level=accuracy_level)


@register_translation(torch.ops.surgery.dq_matmul.default)
def _dq_matmul(A, B, scale, zero_point, bias, block_size: int, bits: int):
    if bits == 4:  # int4 values travel in an int8 container; export.py folds these casts
        signed = zero_point is None
        B = op.Cast(B, to=ir.DataType.INT4 if signed else ir.DataType.UINT4)
        if zero_point is not None:
            zero_point = op.Cast(zero_point, to=ir.DataType.UINT4)
    W = op.DequantizeLinear(B, scale, zero_point, axis=0 if block_size else 1,
                            block_size=block_size)
    Y = op.MatMul(A, W)
    return Y if bias is None else op.Add(Y, bias)


def _register_op_translations() -> None:
    """The translation each op record names (backends/ops/*: ``Op.onnx``)."""
    for op_record in all_ops().values():
        if op_record.onnx is not None:
            register_translation(op_record.overload)(Lazy(op_record.onnx).resolve())


_register_op_translations()
