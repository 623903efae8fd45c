"""One layer's compressed variant at one level, by the method nested in `method=...`.

The database needs each layer at many levels from one set of calibration statistics (one
Hessian per layer), so the nested method is run as its per-layer core function here rather than
as a whole pass (which would calibrate once per level). Supported: prune with sparsegpt, wanda
or magnitude; quantize with gptq or rtn. The nested call's parameters are validated by that
pass's own `Params`, so `method=gptq(group=63)` gets gptq's message.
"""

from __future__ import annotations

from typing import Any

import torch

from surgery.passapi import CallValue, Percent
from surgery.passes.calib.stats import LinearStats

PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")
QUANT_METHODS = ("gptq", "rtn")


def as_call(v: Any) -> CallValue:
    return CallValue(name=v) if isinstance(v, str) else v


def inner_params(verb: str, call: CallValue, data: str | None):
    """The nested method's validated Params (a placeholder for the statement field; the
    nested call's own `data`, if any, must name the outer `data`)."""
    from surgery.registry import get_pass

    call = as_call(call)
    names = PRUNE_METHODS if verb == "prune" else QUANT_METHODS
    if call.name not in names:
        raise ValueError(f"`{call.name}` cannot build the levels (available: {', '.join(names)})")
    kw = dict(call.kwargs)
    if "data" in kw and data is not None and kw["data"] != data:
        raise ValueError(f"the method's data `{kw['data']}` differs from data `{data}`; "
                         "give data once, to the outer method")
    P = get_pass(verb, call.name)
    if "data" in P.Params.model_fields:
        kw["data"] = data
    if verb == "prune":
        kw["sparsity"] = Percent(value=50)
    else:
        kw["format"] = "int4"
    return P.Params(**kw)


def needs_gram(verb: str, call: CallValue) -> bool:
    return as_call(call).name in ("sparsegpt", "gptq")


@torch.no_grad()
def prune_variant(call: CallValue, params, W: torch.Tensor, stats: LinearStats,
                  fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, keep mask) of ``W`` pruned to ``fraction`` by the nested method."""
    from surgery.passes.prune.masks import row_keep, unstructured_keep
    from surgery.passes.prune.sparsegpt_core import sparsegpt
    from surgery.passes.prune.wanda import wanda_scores

    call = as_call(call)
    if fraction == 0:
        return W.clone(), torch.ones_like(W, dtype=torch.bool)
    if call.name == "sparsegpt":
        return sparsegpt(W, stats.hessian(), fraction=fraction, blocksize=params.block,
                         percdamp=params.damp)
    if call.name == "wanda":
        scores = wanda_scores(W, stats.col_norms())
        keep = unstructured_keep(scores, fraction, params.scope or "row")
    else:
        keep = unstructured_keep(W.abs().float(), fraction, params.scope or "layer")
    return W.masked_fill(~keep, 0), keep


@torch.no_grad()
def quant_variant(call: CallValue, params, module, stats: LinearStats, bits: int):
    """The QuantLinear of ``module`` at ``bits`` by the nested method."""
    from surgery.passes.quantize.common import existing_mask, to_quantlinear
    from surgery.passes.quantize.formats import Format
    from surgery.passes.quantize.gptq import gptq_quantize
    from surgery.passes.quantize.rtn import rtn_quantize

    call = as_call(call)
    sym = params.symmetric if params.symmetric is not None else bits == 8
    fmt = Format(bits, sym)
    W = module.weight
    if call.name == "gptq":
        r = gptq_quantize(W, stats.hessian(), fmt, params.group, block=params.block,
                          damp=params.damp, act_order=params.act_order,
                          static_groups=params.static_groups, clip=params.clip_search(),
                          mask=existing_mask(module))
        return to_quantlinear(module, r.codes, r.scales, r.zeros, fmt, perm=r.perm)
    codes, scale, zero = rtn_quantize(W, fmt, params.group_for(module.in_features),
                                      params.clip_search(), existing_mask(module))
    return to_quantlinear(module, codes, scale, zero, fmt)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, stats: LinearStats) -> float:
    """Relative output error on the calibration inputs: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with the
    layer's input Gram matrix (its diagonal when only norms were collected)."""
    D = (W.float() - W_hat.float())
    if stats.gram is not None:
        H = stats.gram.float()
        num, den = float(((D @ H) * D).sum()), float(((W.float() @ H) * W.float()).sum())
    else:
        c = stats.col_norms().float() ** 2
        num, den = float((D ** 2 * c).sum()), float((W.float() ** 2 * c).sum())
    return num / den if den else 0.0
