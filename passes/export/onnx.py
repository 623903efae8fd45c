"""`export onnx "PATH"` / `export onnx(opset=21, int4=qdq, accuracy_level=0) "PATH"` /
`export onnx(kv_cache=true) "DIR/model.onnx"`.

Exports the current model (HF causal LMs: ``input_ids -> logits``, or with ``kv_cache=true`` the
optimum / onnxruntime-genai decoder with past/present key-value tensors, plus config.json,
generation_config.json and the tokenizer beside it; HF encoders: ``input_ids, attention_mask[,
token_type_ids] -> last_hidden_state``; plain modules: ``x -> y``) through backends/onnx,
verifies it in ONNX Runtime against PyTorch and writes it atomically. int4 layers become
``com.microsoft::MatMulNBits`` (default) or ``DequantizeLinear`` (INT4/UINT4, blocked) +
``MatMul``; int8 layers become ``DequantizeLinear`` + ``MatMul``.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import field_validator

from surgery.passapi import Granularity, ModelPass, PassParams, PassResult, RunContext, State, StepReport
from surgery.registry import register


class OnnxParams(PassParams):
    path: str
    opset: int = 21
    int4: Literal["matmulnbits", "qdq"] = "matmulnbits"
    accuracy_level: int = 0  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    verify: bool = True  # run the file in ONNX Runtime and compare with PyTorch
    tolerance: float = 1e-3  # max relative logit difference accepted by the verification
    seqlen: int = 16  # tokens of the example input used for tracing and verification
    dynamic: bool = True  # dynamic batch and sequence axes
    kv_cache: bool = False  # decoders: past_key_values inputs / present outputs (generation)

    @field_validator("opset")
    @classmethod
    def _opset(cls, v):
        if not 21 <= v <= 23:
            raise ValueError("opset must be between 21 and 23 (blocked int4 DequantizeLinear "
                             "needs 21)")
        return v

    @field_validator("accuracy_level")
    @classmethod
    def _acc(cls, v):
        if v not in (0, 1, 2, 3, 4):
            raise ValueError("accuracy_level must be 0, 1, 2, 3 or 4")
        return v

    @field_validator("tolerance")
    @classmethod
    def _tol(cls, v):
        if v <= 0:
            raise ValueError("tolerance must be > 0")
        return v

    @field_validator("seqlen")
    @classmethod
    def _seqlen(cls, v):
        if v < 2:
            raise ValueError("seqlen must be >= 2")
        return v


@register
class OnnxExport(ModelPass):
    statement_fields = frozenset({"path"})
    verb = "export"
    method = "onnx"
    summary = "export to ONNX (int4 as MatMulNBits or QDQ), verified in ONNX Runtime"
    Params = OnnxParams
    accepts = frozenset(State)  # export reads any state and changes none
    is_output = True
    granularity = Granularity.MODEL  # traces the whole model's forward

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        from surgery.modelcall import ModelKind

        p: OnnxParams = self.params
        kind = ModelKind.of(ctx.model)
        if p.kv_cache or kind is ModelKind.ENCODER:
            return self._serving(ctx, modules, kind)
        from surgery.backends.onnx import example_input, export_onnx

        x = example_input(ctx.model, p.seqlen, ctx.seed)
        r = export_onnx(ctx.model, p.path, example=x, int4=p.int4,
                        accuracy_level=p.accuracy_level, opset=p.opset, verify=p.verify,
                        tolerance=p.tolerance, dynamic=p.dynamic)
        notes = []
        if p.dynamic and not r.dynamic:
            notes.append("dynamic axes failed to trace; the file has fixed input shape "
                         f"{tuple(x.shape)}")
        return self._report(ctx, modules, r, notes)

    def _serving(self, ctx: RunContext, modules, kind) -> PassResult:
        """The decoder with a KV cache (plus its config and tokenizer) or the masked encoder."""
        from pathlib import Path

        from surgery import emit
        from surgery.backends.onnx.generation import (export_decoder_with_cache, export_encoder,
                                                      write_sidecars)
        from surgery.modelcall import ModelKind
        from surgery.passes.export.peft import base_source_dir

        p: OnnxParams = self.params
        common = dict(int4=p.int4, accuracy_level=p.accuracy_level, opset=p.opset,
                      tolerance=p.tolerance, seed=ctx.seed)
        if kind is ModelKind.ENCODER and not p.kv_cache:
            r = export_encoder(ctx.model, p.path, seqlen=p.seqlen, **common)
            return self._report(ctx, modules, r, ["inputs input_ids, attention_mask (padded "
                                                  "batches match unpadded ones)"])
        r = export_decoder_with_cache(ctx.model, p.path, seqlen=min(p.seqlen, 8), **common)
        prov = ctx.extras.get(emit.PROVENANCE)
        files = write_sidecars(ctx.model, Path(p.path).parent,
                               tokenizer=prov.tokenizer if prov is not None else None,
                               tokenizer_source=base_source_dir(ctx), graph=Path(p.path).name)
        return self._report(ctx, modules, r, [f"KV-cache decoder graph; beside it: "
                                              f"{', '.join(files)}"])

    def _report(self, ctx, modules, r, notes: list[str]) -> PassResult:
        metrics = {"path": r.path, "bytes": r.bytes, "opset": r.opset, "verified": r.verified,
                   "max_abs_diff": r.max_abs_diff, "max_rel_diff": r.max_rel_diff,
                   "dynamic_axes": r.dynamic, "ops": r.op_counts}
        notes = [f"wrote {r.path} ({r.bytes / 2**20:.1f} MiB)"] + notes
        if r.verified:
            notes.append(f"ONNX Runtime matches PyTorch (max "
                         f"relative difference {r.max_rel_diff:.1e})")
        n = sum(q.numel() for q in ctx.model.parameters())
        return self.result(ctx, StepReport(modules=len(modules), parameters=n, metrics=metrics,
                                           notes=notes))
