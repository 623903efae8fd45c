"""`export gguf "out.gguf"` / `export gguf(type=q4_0) "out.gguf"`: one GGUF file for llama.cpp.

``type`` is the GGML type of the weight matrices inside the blocks. ``auto`` (default) keeps
quantized layers' codes where a GGML type means the same (int8 sym -> Q8_0, int4 sym -> Q4_0,
int4 asym -> Q4_1; groups a multiple of 32) and writes float layers as f16. Any other request
requantises from the weights our model computes with, and the report gives the added relative
weight error per kind of tensor. Embeddings and a float output head are f16 (f32/bf16 when that
is the requested type), norms f32. ``q4_k`` / ``q5_k`` / ``q6_k`` are llama.cpp's K-quant
mixes (Q4_K_M, Q5_K_M, Q6_K), written by its own quantizer (llama-cpp-python) from an f16 file.
surgery/deploy/gguf_file.py has the details and the refusals.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from surgery.passapi import (Granularity, ModelPass, OutputPath, PassParams, PassResult,
                             RunContext, State, StepReport)
from surgery.registry import register


class GGUFParams(PassParams):
    path: OutputPath = Field(description="output .gguf file (written atomically)")
    type: Literal["auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k",
                  "q6_k"] = "auto"


@register
class GGUFExport(ModelPass):
    statement_fields = frozenset({"path"})
    verb = "export"
    method = "gguf"
    summary = "write a GGUF file for llama.cpp (our int8/int4 codes kept where GGML matches)"
    Params = GGUFParams
    accepts = frozenset(State)  # export reads any state and changes none
    is_output = True
    granularity = Granularity.TENSOR  # tensors are encoded one by one

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        from surgery import emit
        from surgery.deploy import gguf_file
        from surgery.passes.export.peft import base_source_dir

        p: GGUFParams = self.params
        prov = ctx.extras.get(emit.PROVENANCE)
        tokenizer = prov.tokenizer if prov is not None else None
        r = gguf_file.write(ctx.model, p.path, type=p.type, tokenizer=tokenizer,
                            tokenizer_source=base_source_dir(ctx))
        notes = [f"wrote {r.path} ({r.bytes / 2**20:.1f} MiB, {len(r.tensors)} tensors: "
                 + ", ".join(f"{n} {t}" for t, n in r.types().items()) + ")"]
        if r.count("carried"):
            notes.append(f"{r.count('carried')} quantized weights keep their integer codes "
                         f"(scales rounded to fp16: relative weight error at most "
                         f"{r.max_rel_error('carried'):.1e})")
        if r.count("requantized"):
            kinds = sorted({t.encoded.ggml_type for t in r.tensors if t.encoded.how == "requantized"})
            notes.append(f"{r.count('requantized')} weights requantised to {'/'.join(kinds)} from "
                         f"our weights: relative weight error at most "
                         f"{r.max_rel_error('requantized'):.2e}")
        if r.count("fallback"):
            notes.append(f"{r.count('fallback')} weights written as f16: their input size is "
                         "not a multiple of GGML's 32-wide blocks")
        metrics = {"path": r.path, "bytes": r.bytes, "arch": r.arch, "types": r.types(),
                   "carried": r.count("carried"), "requantized": r.count("requantized"),
                   "max_rel_weight_error": r.max_rel_error(),
                   "max_rel_weight_error_requantized": r.max_rel_error("requantized"),
                   "vocab": r.vocab}
        n = sum(q.numel() for q in ctx.model.parameters())
        return self.result(ctx, StepReport(modules=len(r.tensors), parameters=n, metrics=metrics,
                                           notes=notes))
