"""Where ops get lowered, and the forwards that call the kernels.

Three kinds of site:

- ``QuantLinear`` (int4_linear / int8_linear): its forward calls the op through
  :func:`runtime.call`.
- a swapped attention module (``swap softmax ... for stablemax | softplus``): its forward runs
  under the attention swap's dataflow rewrite (:class:`AttentionRewrite`) extended by rules:
  :func:`lowered_rules` puts a rule in front that routes a softplus swap's whole
  ``scaled_dot_product_attention`` call to the fused ``surgery::softplus_attention`` kernel when
  its mask is causal and/or a key padding mask, and the normaliser is replaced by
  ``surgery::stablemax`` on the kernel (anything else keeps the reference path, counted as a
  fallback).
- any other selected module (softmax, stablemax, log_stablemax): its forward runs under
  :class:`OpLowering`, which sees every torch call it makes (the hook torch.fx's tracer uses) and
  routes ``softmax`` and ``surgery::stablemax`` / ``log_stablemax`` calls to the kernels.

Every site gets a ``triton_lowering`` child (:class:`TritonLowering`, a
:class:`surgery.forward_rewrite.ForwardRewrite`, no tensors) recording the lowered ops, so the
manifest carries it and ``surgery_attach`` re-installs the forward after load. Which op runs at
which site comes from the op records (backends/ops/registry.py, ``Op.sites``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from surgery.backends.ops.registry import ops_at
from surgery.forward_rewrite import Counts, ForwardRewrite
from surgery.passes.attention import functional as AF
from surgery.passes.attention import swap
from surgery.passes.attention.intercept import _SDPA, NO_MATCH, AttentionRewrite, Rule
from surgery.passes.lower import runtime
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.registry import register_module_type

MARKER = "triton_lowering"
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}

__all__ = ["Counts", "MARKER", "TritonLowering", "install", "site_kind", "uninstall"]


def site_kind(module: nn.Module, ops: set[str]) -> tuple[str, list[str]] | None:
    """("quant" | "attention" | "generic", ops lowered there) or None if nothing applies.

    Which op a quantized layer or a swapped attention module calls comes from the op records'
    sites (backends/ops/*): ("quant", bits) and ("attention", normaliser kind)."""
    if isinstance(module, QuantLinear):
        found = [op for op in ops_at("quant", module.bits) if op in ops]
        return ("quant", found) if found else None
    if swap.is_swapped(module):
        found = [op for op in ops_at("attention", module._modules[swap.MARKER].spec.kind)
                 if op in ops]
        return ("attention", found) if found else None
    generic = sorted(ops & set(ops_at("generic")))
    return ("generic", generic) if generic else None


# -- QuantLinear -----------------------------------------------------------------------------

def _quant_forward(marker: "TritonLowering", layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if layer.perm is not None:
        x = x.index_select(-1, layer.perm)
    marker.counts.kernel += 1
    if layer.bits == 8:
        return runtime.call("int8_linear", x, layer.qweight, layer.scales, layer.zeros, layer.bias)
    return runtime.call("int4_linear", x, layer.qweight, layer.scales, layer.zeros, layer.bias,
                        layer.in_features)


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


def _stablemax_on_kernel(counts: Counts):
    """The attention normaliser for a lowered swap: StableMax on the kernel; softplus keeps
    the reference (its kernel is the fused SDPA rule below), counted as a fallback."""
    def normalise(mode: AttentionRewrite, logits, fact, visible, bias):
        if mode.spec.kind != "stablemax":
            counts.fallback += 1
            return mode.reference_normalise(logits, fact, visible, bias)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.to(acc)
        if visible is not None:
            vis = visible.expand(x.shape)
            x = torch.where(vis, x, torch.full_like(x, float("-inf")))  # s(-inf) = 0
        w = runtime.call("stablemax", x, -1)
        if visible is not None:  # a fully masked row is all zero, not 0/0
            w = torch.where(vis.any(-1, keepdim=True), w, torch.zeros_like(w))
        counts.kernel += 1
        return w
    return normalise


def _softplus_sdpa_on_kernel(counts: Counts):
    """Rule handler: a softplus swap's whole SDPA call on the fused kernel, when the kernel
    covers its mask and settings; otherwise NO_MATCH (the reference SDPA rule runs)."""
    def handler(mode: AttentionRewrite, func, args, kwargs):
        return _fused_sdpa(mode, counts, *args, **kwargs)
    return handler


def _fused_sdpa(mode: AttentionRewrite, counts: Counts, query, key, value, attn_mask=None,
                dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    spec = mode.spec
    reweight = spec.reweight and (spec.reweight_at_train or not mode.training)
    plan = None
    if (spec.kind == "softplus" and not mode.hooks and dropout_p == 0.0
            and spec.offset_rows == 3 and (not reweight or spec.p > 0)
            and query.shape[-3] % key.shape[-3] == 0):
        plan = _kernel_mask(query, key, attn_mask, is_causal)
    if plan is None:
        if spec.kind == "softplus":
            counts.fallback += 1
        return NO_MATCH
    causal, key_mask = plan
    mode.stats.sdpa += 1
    mode.stats.rewritten += 1
    mode.stats.weighted_sums += 1
    counts.kernel += 1
    return runtime.call("softplus_attention", query, key, value, key_mask, causal,
                        float(spec.p) if reweight else 0.0, float(spec.eps),
                        bool(spec.fallback_on_empty))


def lowered_rules(counts: Counts) -> list[Rule]:
    """The attention swap's rules with the kernel rule in front (first match wins)."""
    return [(frozenset(_SDPA), None, _softplus_sdpa_on_kernel(counts))] + AttentionRewrite.RULES


def _attention_forward(marker: "TritonLowering", module: nn.Module, *args, **kwargs):
    swapped: swap.AttentionSwap = module._modules[swap.MARKER]
    mode = AttentionRewrite(swapped.spec, module.training, swapped.hooks,
                            rules=lowered_rules(marker.counts),
                            normaliser=_stablemax_on_kernel(marker.counts))
    with mode:
        out = type(module).forward(module, *args, **kwargs)
    swapped.last_stats = mode.stats
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


def _generic_forward(marker: "TritonLowering", module: nn.Module, *args, **kwargs):
    with OpLowering(marker.ops, marker.softmax_algorithm, marker.counts):
        return type(module).forward(module, *args, **kwargs)


_FORWARDS = {"quant": _quant_forward, "attention": _attention_forward, "generic": _generic_forward}


@register_module_type
class TritonLowering(ForwardRewrite):
    """Marker child of a lowered module: which ops run on the Triton kernels."""

    marker_name = MARKER

    def __init__(self, kind: str, ops: list[str], softmax_algorithm: str = "fused"):
        super().__init__()
        self.kind, self.ops, self.softmax_algorithm = kind, list(ops), softmax_algorithm

    def surgery_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "ops": self.ops, "softmax_algorithm": self.softmax_algorithm}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "TritonLowering":
        return cls(cfg["kind"], cfg["ops"], cfg.get("softmax_algorithm", "fused"))

    def run(self, parent: nn.Module, *args, **kwargs):
        return _FORWARDS[self.kind](self, parent, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{', '.join(self.ops)} -> triton"


def install(module: nn.Module, kind: str, ops: list[str], algorithm: str) -> TritonLowering:
    marker = TritonLowering(kind, ops, algorithm)
    marker.surgery_attach(module)
    return marker


def uninstall(module: nn.Module, saved_forward: Any) -> None:
    """Undo :func:`install` (the gate failed): drop the marker, restore the instance forward."""
    module._modules[MARKER].uninstall(module, saved_forward)
