"""Where ops get lowered, and the forwards that call the kernels.

Three kinds of site:

- ``QuantLinear`` (int4_linear / int8_linear): its forward calls the op through
  :func:`runtime.call`.
- a swapped attention module (``swap softmax ... for stablemax | softplus``): its forward runs
  under :class:`LoweredRewrite`, the attention swap's dataflow rewrite with the normaliser routed
  to ``surgery::stablemax`` and, for softplus, the whole ``scaled_dot_product_attention`` call
  routed to the fused ``surgery::softplus_attention`` kernel when its mask is causal and/or a key
  padding mask (anything else keeps the reference path, counted as a fallback).
- any other selected module (softmax, stablemax, log_stablemax): its forward runs under
  :class:`OpLowering`, which sees every torch call it makes (the hook torch.fx's tracer uses) and
  routes ``softmax`` and ``surgery::stablemax`` / ``log_stablemax`` calls to the kernels.

Every site gets a ``triton_lowering`` child (:class:`TritonLowering`, no tensors) recording the
lowered ops, so the manifest carries it and ``surgery_attach`` re-installs the forward after load.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from surgery.passes.lower import runtime
from surgery.registry import register_module_type

MARKER = "triton_lowering"
ATTENTION_OPS = {"stablemax", "softplus_attention"}
QUANT_OPS = {4: "int4_linear", 8: "int8_linear"}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


@dataclass
class Counts:
    kernel: int = 0  # op calls that ran the kernel
    fallback: int = 0  # op calls that kept the reference path (pattern not covered)


def _quant_linear_cls():
    try:
        from surgery.passes.quantize.qlinear import QuantLinear
    except ImportError:  # the quantize family is not installed
        return None
    return QuantLinear


def _swap():
    try:
        from surgery.passes.attention import swap
    except ImportError:
        return None
    return swap


def site_kind(module: nn.Module, ops: set[str]) -> tuple[str, list[str]] | None:
    """("quant" | "attention" | "generic", ops lowered there) or None if nothing applies."""
    ql = _quant_linear_cls()
    if ql is not None and isinstance(module, ql):
        op = QUANT_OPS[module.bits]
        return ("quant", [op]) if op in ops else None
    swap = _swap()
    if swap is not None and swap.is_swapped(module):
        kind = module._modules[swap.MARKER].spec.kind
        op = "stablemax" if kind == "stablemax" else "softplus_attention"
        return ("attention", [op]) if op in ops else None
    generic = sorted(ops & {"softmax", "stablemax", "log_stablemax"})
    return ("generic", generic) if generic else None


# -- QuantLinear -----------------------------------------------------------------------------

def _quant_forward(self, x: torch.Tensor) -> torch.Tensor:
    marker: TritonLowering = self._modules[MARKER]
    if self.perm is not None:
        x = x.index_select(-1, self.perm)
    marker.counts.kernel += 1
    if self.bits == 8:
        return runtime.call("int8_linear", x, self.qweight, self.scales, self.zeros, self.bias)
    return runtime.call("int4_linear", x, self.qweight, self.scales, self.zeros, self.bias,
                        self.in_features)


# -- swapped attention ---------------------------------------------------------------------------

def _tracing(*tensors) -> bool:
    """True under torch.compile / torch.export, where tensor values cannot be inspected."""
    if torch.compiler.is_compiling():
        return True
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is not None and exporting():
        return True
    from torch._guards import detect_fake_mode

    return detect_fake_mode(tensors) is not None


def _kernel_mask(query, key, attn_mask, is_causal) -> tuple[bool, torch.Tensor | None] | None:
    """(causal, key_mask) when the SDPA mask is causal and/or key padding; else None."""
    from surgery.passes.attention import functional as AF

    if query.dim() != 4 or key.dim() != 4:
        return None
    b, lq, lk = query.shape[0], query.shape[-2], key.shape[-2]
    if attn_mask is None:
        return (True, None) if not is_causal or lq == lk else None
    if _tracing(query, attn_mask):
        return None  # the mask's values are unknown while tracing: keep the reference path
    visible, bias = AF.visible_from_mask(attn_mask)
    if bias is not None and bool(bias.any()):
        return None  # a finite additive bias (ALiBi ...) is not in the kernel
    vis = visible
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    vis = vis.expand(b, vis.shape[1], lq, lk)
    if vis.shape[1] > 1 and not bool((vis == vis[:, :1]).all()):
        return None  # per-head masks
    vis = vis[:, 0]
    if is_causal:
        vis = vis & AF.causal_visible(lq, lk, query.device)
    key_mask = vis.any(dim=1)  # (B, Lk): keys some query may read
    tri = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
    for causal, expect in ((True, tri[None] & key_mask[:, None]),
                           (False, key_mask[:, None].expand(b, lq, lk))):
        if bool((expect == vis).all()):
            return causal, (None if bool(key_mask.all()) else key_mask)
    return None


def _lowered_rewrite_cls():
    from surgery.passes.attention.intercept import AttentionRewrite

    class LoweredRewrite(AttentionRewrite):
        """The attention swap's rewrite with the new normaliser running on the kernels."""

        def __init__(self, spec, training, hooks, counts: Counts):
            super().__init__(spec, training, hooks)
            self.counts = counts

        def _normalise(self, logits, fact, visible, bias):
            if self.spec.kind != "stablemax":
                self.counts.fallback += 1
                return super()._normalise(logits, fact, visible, bias)
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            x = logits.to(acc)
            if visible is not None:
                vis = visible.expand(x.shape)
                x = torch.where(vis, x, torch.full_like(x, float("-inf")))  # s(-inf) = 0
            w = runtime.call("stablemax", x, -1)
            if visible is not None:  # a fully masked row is all zero, not 0/0
                w = torch.where(vis.any(-1, keepdim=True), w, torch.zeros_like(w))
            self.counts.kernel += 1
            return w

        def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False):
            spec = self.spec
            reweight = spec.reweight and (spec.reweight_at_train or not self.training)
            plan = None
            if (spec.kind == "softplus" and not self.hooks and dropout_p == 0.0
                    and spec.offset_rows == 3 and (not reweight or spec.p > 0)
                    and query.shape[-3] % key.shape[-3] == 0):
                plan = _kernel_mask(query, key, attn_mask, is_causal)
            if plan is None:
                if spec.kind == "softplus":
                    self.counts.fallback += 1
                return super()._sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                     enable_gqa)
            causal, key_mask = plan
            self.stats.sdpa += 1
            self.stats.rewritten += 1
            self.stats.weighted_sums += 1
            self.counts.kernel += 1
            return runtime.call("softplus_attention", query, key, value, key_mask, causal,
                                float(spec.p) if reweight else 0.0, float(spec.eps),
                                bool(spec.fallback_on_empty))

    return LoweredRewrite


def _attention_forward(self, *args, **kwargs):
    swap = _swap()
    marker = self._modules[swap.MARKER]
    lowering: TritonLowering = self._modules[MARKER]
    mode = _lowered_rewrite_cls()(marker.spec, self.training, marker.hooks, lowering.counts)
    with mode:
        out = type(self).forward(self, *args, **kwargs)
    marker.last_stats = mode.stats
    return out


# -- anything else: softmax / stablemax / log_stablemax calls ----------------------------------

class OpLowering(TorchFunctionMode):
    """Routes softmax and surgery::(log_)stablemax calls made by a module to the kernels."""

    def __init__(self, ops: list[str], algorithm: str, counts: Counts):
        super().__init__()
        self.ops, self.algorithm, self.counts = set(ops), algorithm, counts

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX and "softmax" in self.ops:
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            dtype = kwargs.get("dtype")
            if dim is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
                if dtype is not None:
                    x = x.to(dtype)
                self.counts.kernel += 1
                return runtime.call("softmax", x, dim, self.algorithm)
        for name in ("stablemax", "log_stablemax"):
            if name in self.ops and func in (getattr(torch.ops.surgery, name),
                                             getattr(torch.ops.surgery, name).default):
                self.counts.kernel += 1
                return runtime.call(name, *args, *kwargs.values())
        return func(*args, **kwargs)


def _generic_forward(self, *args, **kwargs):
    lowering: TritonLowering = self._modules[MARKER]
    with OpLowering(lowering.ops, lowering.softmax_algorithm, lowering.counts):
        return type(self).forward(self, *args, **kwargs)


_FORWARDS = {"quant": _quant_forward, "attention": _attention_forward, "generic": _generic_forward}


@register_module_type
class TritonLowering(nn.Module):
    """Marker child of a lowered module: which ops run on the Triton kernels."""

    def __init__(self, kind: str, ops: list[str], softmax_algorithm: str = "fused"):
        super().__init__()
        self.kind, self.ops, self.softmax_algorithm = kind, list(ops), softmax_algorithm
        self.counts = Counts()

    def surgery_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "ops": self.ops, "softmax_algorithm": self.softmax_algorithm}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "TritonLowering":
        return cls(cfg["kind"], cfg["ops"], cfg.get("softmax_algorithm", "fused"))

    def surgery_attach(self, parent: nn.Module) -> None:
        """Route ``parent``'s forward through the kernels (idempotent)."""
        if parent._modules.get(MARKER) is not self:
            setattr(parent, MARKER, self)
        parent.forward = types.MethodType(_FORWARDS[self.kind], parent)

    def forward(self, *args, **kwargs):  # pragma: no cover - a marker is never called
        raise RuntimeError("TritonLowering is a marker; call its parent module")

    def extra_repr(self) -> str:
        return f"{', '.join(self.ops)} -> triton"


def install(module: nn.Module, kind: str, ops: list[str], algorithm: str) -> TritonLowering:
    marker = TritonLowering(kind, ops, algorithm)
    marker.surgery_attach(module)
    return marker


def uninstall(module: nn.Module, saved_forward: Any) -> None:
    """Undo :func:`install` (the gate failed): drop the marker, restore the instance forward."""
    del module._modules[MARKER]
    if saved_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved_forward
