"""`quantize SEL to int2..int8 using gptq(data=calib, group=64, ...)`: GPTQ (spec ops.md §8.2).

Per Linear, with the layer Hessian H = 2/n XᵀX from calibration inputs: columns are quantised
one at a time and each column's rounding error is spread over the not-yet-quantised columns
through the upper Cholesky factor of H⁻¹, with lazy block updates (``block`` columns). Layers are
calibrated layer-sequentially (passes/calib): each decoder block sees the outputs of the already
quantised blocks before it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from pydantic import field_validator

from surgery import distributed
from surgery.passapi import DataRef, Granularity, PassError, PassResult, RunContext
from surgery.passes.calib import HessianError, calibrate_sequential
from surgery.passes.calib.hessian import (act_order_perm, add_damping, dead_columns,
                                          inverse_cholesky_upper)
from surgery.passes.quantize.common import (QuantizePass, QuantParams, build_report,
                                            existing_mask, float_bytes, relative_error,
                                            to_quantlinear)
from surgery.passes.quantize.formats import (ClipSearch, Format, dequantize_codes,
                                             fit_group_params, quantize_codes)
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.registry import register


@dataclass
class GptqResult:
    codes: torch.Tensor  # (out, in) int32, in stored column order
    scales: torch.Tensor  # (out, groups) float32
    zeros: torch.Tensor | None  # (out, groups) or None (symmetric)
    perm: torch.Tensor | None  # stored column c holds original column perm[c] (act_order only)
    loss: float  # Σ (w - q)² / Hinv_jj² / 2


def _params(w: torch.Tensor, fmt: Format, clip: ClipSearch | None):
    """Scale/zero for each row of ``w`` (out, g) as one group: (out,) tensors."""
    s, z = fit_group_params(w.unsqueeze(1), fmt, clip)
    return s.squeeze(1), (None if z is None else z.squeeze(1))


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of small ops: intra-op threads only add synchronisation
    (and on a shared, oversubscribed CPU they spin; measured 15-30x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: Format, group: int | None, *,
                  block: int = 128, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, clip: ClipSearch | None = None,
                  mask: torch.Tensor | None = None, consume_hessian: bool = False) -> GptqResult:
    """GPTQ of one weight (out, in) with Hessian H (in, in); the reference ``fasterquant``.

    ``group`` None = per output channel. With ``act_order`` and no ``static_groups`` the groups
    follow the permuted column order, so the result is stored permuted (``perm``) and groups stay
    contiguous in storage. ``mask`` (True = kept) pins pruned weights to exact zeros.
    ``consume_hessian``: H (float32) is overwritten and released as soon as it is factored (at
    14336 inputs each copy of H is 0.8 GB); the caller must not keep a reference to it.
    """
    if not (consume_hessian and H.dtype == torch.float32):
        H = H.detach().to(torch.float32).clone()
    box = [H]  # handed over in a list so that no frame but _gptq's holds H
    del H
    with _one_thread():
        return _gptq(W, box, fmt, group, block, damp, act_order, static_groups, clip, mask)


def _gptq(W, box, fmt, group, block, damp, act_order, static_groups, clip, mask) -> GptqResult:
    W = W.detach().to(torch.float32).clone()
    H = box.pop()
    rows, cols = W.shape
    g = group or cols
    if mask is not None:
        mask = mask.to(torch.bool)
    # Per-channel parameters come from the original weight (before dead columns are zeroed).
    row_params = _params(W, fmt, clip) if group is None else None
    dead_columns(H, W)
    static = None
    if static_groups and group is not None:
        static = [_params(W[:, i:i + g], fmt, clip) for i in range(0, cols, g)]
    perm = None
    if act_order:
        perm = act_order_perm(H)
        W = W[:, perm]
        H = H[perm]  # one permuted copy at a time: the previous one is freed
        H = H[:, perm]
        if mask is not None:
            mask = mask[:, perm]
    add_damping(H, damp)
    Hinv = inverse_cholesky_upper(H, overwrite=True)
    del H

    n_groups = cols // g
    scales = torch.empty(rows, n_groups)
    zeros = None if fmt.symmetric else torch.empty(rows, n_groups)
    Q = torch.empty(rows, cols, dtype=torch.int32)
    losses = torch.zeros(rows)
    scale = zero = None
    if row_params is not None:
        scale, zero = row_params
        scales[:, 0] = scale
        if zeros is not None:
            zeros[:, 0] = zero
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group is not None:
                if static is not None:
                    scale, zero = static[(int(perm[j]) if perm is not None else j) // g]
                elif j % g == 0:
                    # Fitted on the global W: lazy updates of earlier blocks, not this block's.
                    scale, zero = _params(W[:, j:j + g], fmt, clip)
                    scales[:, j // g] = scale
                    if zeros is not None:
                        zeros[:, j // g] = zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_codes(w.unsqueeze(1), scale, zero, fmt).squeeze(1)
            if mask is not None:
                pinned = torch.zeros_like(q) if zero is None else zero.to(torch.int32)
                q = torch.where(mask[:, j], q, pinned)
            Q[:, j] = q
            w_hat = dequantize_codes(q.unsqueeze(1), scale, zero).squeeze(1)
            err = (w - w_hat) / d
            losses += (w - w_hat) ** 2 / d ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static is not None:
        for k, (s, z) in enumerate(static):
            scales[:, k] = s
            if zeros is not None:
                zeros[:, k] = z
    if perm is not None and (static is not None or group is None):
        # Groups are in original column order: store unpermuted, no gather at inference.
        Q = Q[:, torch.argsort(perm)]
        perm = None
    return GptqResult(Q, scales, zeros, perm, float(losses.sum()))


class GptqParams(QuantParams):
    data: DataRef  # name of a `data` declaration (required: GPTQ needs calibration inputs)
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block: int = 128  # lazy-update block of columns
    act_order: bool = False  # quantise columns by decreasing Hessian diagonal
    static_groups: bool = False  # group parameters from the original weight (with act_order)
    true_sequential: bool = False  # within a block: q/k/v, then o, then gate/up, then down
    samples: int | None = None  # use only the first N calibration samples
    batch: int = 8  # calibration sequences per forward

    @field_validator("damp")
    @classmethod
    def _damp(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError("damp must be in (0, 1]")
        return v

    @field_validator("block", "batch", "samples")
    @classmethod
    def _positive(cls, v, info):
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return v


@register
class Gptq(QuantizePass):
    method = "gptq"
    summary = "GPTQ: Hessian-aware int2..int8 weight quantisation, layer-sequential calibration"
    Params = GptqParams
    granularity = Granularity.BLOCK

    @property
    def permuted(self) -> bool:
        """act_order with plain groups stores the columns permuted (see `gptq_quantize`)."""
        p = self.params
        return p.act_order and p.group is not None and not p.static_groups

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        p: GptqParams = self.params
        fmt = p.fmt()
        ds = ctx.dataset(p.data)
        calib = ds.calibration if p.samples is None else ds.calibration[:p.samples]
        results, sizes = {}, [0, 0]

        def transform(mods, stats):
            out = {}
            for path, mod in mods.items():
                w = mod.weight
                try:
                    r = gptq_quantize(w, stats[path].take_hessian(), fmt,
                                      p.group, block=p.block, damp=p.damp,
                                      act_order=p.act_order, static_groups=p.static_groups,
                                      clip=p.clip_search(), mask=existing_mask(mod),
                                      consume_hessian=True)
                except HessianError as e:
                    raise PassError(str(e), module=path,
                                    hint=f"try damp={min(1.0, p.damp * 10):g}") from None
                q = to_quantlinear(mod, r.codes, r.scales, r.zeros, fmt, perm=r.perm)
                results[path] = {"parameters": w.numel(), "gptq_loss": r.loss,
                                 "rel_error": relative_error(w, q.dequantized_weight())}
                sizes[0] += float_bytes(mod)
                sizes[1] += q.storage_bytes()
                out[path] = q
            return out

        calibrate_sequential(ctx.model, calib, modules, transform, progress=ctx.progress,
                             batch_size=p.batch, true_sequential=p.true_sequential,
                             label=f"GPTQ {p.format}")
        # distributed: each rank solved some layers; rank 0 reports them all (no-op otherwise)
        results = distributed.merged_report(results, order=list(modules))
        sizes = distributed.summed(sizes)
        extra = {"calibration_samples": int(calib.shape[0]),
                 "calibration_tokens": int(calib.numel()),
                 "total_gptq_loss": float(sum(r["gptq_loss"] for r in results.values()))}
        return self.result(ctx, build_report(results, sizes[0], sizes[1], p, extra))
