"""`quantize SEL to int2..int8 using rtn(group=, symmetric=, clip=)`: round-to-nearest.

Each group of ``group`` input columns of a row (the whole row when ``group`` is absent) gets its
own scale (and zero point when asymmetric), fitted on the weight alone (spec ops.md §8.1). With
``clip=true`` a per-group clipping ratio is grid-searched to minimise the weight's squared error.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from surgery.passapi import Granularity, PassResult, RunContext, replace_module
from surgery.passes.quantize.common import (QuantizePass, QuantParams, build_report,
                                            existing_mask, float_bytes, relative_error,
                                            to_quantlinear)
from surgery.passes.quantize.formats import (ClipSearch, Format, fit_group_params, grouped,
                                             quantize_codes, zero_code)
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.registry import register


def rtn_quantize(w: torch.Tensor, fmt: Format, group: int, clip: ClipSearch | None = None,
                 mask: torch.Tensor | None = None):
    """Codes (out, in) int32, scales (out, groups) float32, zeros (out, groups) or None.

    ``mask`` (bool, True = kept) forces pruned weights to the code that dequantises to 0.
    """
    wg = grouped(w.detach().to(torch.float32), group)
    scale, zero = fit_group_params(wg, fmt, clip)
    q = quantize_codes(wg, scale, zero, fmt)
    if mask is not None:
        zc = zero_code(zero, scale.shape).unsqueeze(-1).expand_as(q)
        q = torch.where(grouped(mask, group), q, zc)
    return q.reshape(w.shape), scale, zero


@register
class Rtn(QuantizePass):
    method = "rtn"
    summary = "round-to-nearest weight quantisation (int2..int8, per channel or per group)"
    is_default = True
    granularity = Granularity.TENSOR
    Params = QuantParams

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        p: QuantParams = self.params
        fmt = p.fmt()
        results, before, after = {}, 0, 0
        with torch.no_grad(), ctx.progress.task(f"RTN {p.format}", total=len(modules)) as t:
            for path, mod in modules.items():
                codes, scale, zero = rtn_quantize(mod.weight, fmt, p.group_for(mod.in_features),
                                                  p.clip_search(), existing_mask(mod))
                q = to_quantlinear(mod, codes, scale, zero, fmt)
                results[path] = {"parameters": mod.weight.numel(),
                                 "rel_error": relative_error(mod.weight,
                                                             q.dequantized_weight())}
                before += float_bytes(mod)
                after += q.storage_bytes()
                replace_module(ctx.model, path, q)
                t.advance()
        return self.result(ctx, build_report(results, before, after, p))
