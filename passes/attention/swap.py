"""`swap softmax in SEL for stablemax` / `for softplus(...)`: the module-side machinery.

A swapped attention module keeps its class, weights and parameter names (HF checkpoints and
adapters still line up). Two things change:

* a child ``attention_swap`` (:class:`AttentionSwap`, a registered module type with no tensors)
  records the new normaliser, so the manifest carries it and ``surgery.load`` re-inserts it;
* the instance's ``forward`` runs the class forward under :class:`AttentionRewrite`, which
  rewrites the attention softmax in the dataflow as it runs (see intercept.py).

The marker mechanism (attach, uninstall, re-attach after load) is surgery/forward_rewrite.py,
shared with lowering (passes/lower/sites.py).

``AttentionSwap.surgery_attach(parent)`` (or :func:`attach_swaps` over a whole model) re-installs
the forward after loading.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from surgery.forward_rewrite import ForwardRewrite
from surgery.modelcall import forward_ids
from surgery.registry import register_module_type

from .intercept import AttentionRewrite, NormaliserSpec, Stats

MARKER = "attention_swap"


@register_module_type
class AttentionSwap(ForwardRewrite):
    """Marker child of a swapped attention module: which normaliser replaces softmax."""

    marker_name = MARKER

    def __init__(self, spec: NormaliserSpec):
        super().__init__()
        self.spec = spec
        self.hooks: list[Callable] = []  # called as hook(weights, visible) for every rewrite
        self.last_stats: Stats | None = None

    def surgery_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.spec)

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "AttentionSwap":
        return cls(NormaliserSpec(**cfg))

    def surgery_attach(self, parent: nn.Module) -> None:
        """Route ``parent``'s forward through the rewrite (idempotent)."""
        super().surgery_attach(parent)
        if not any(h is _keep_slow_path for h in parent._forward_pre_hooks.values()):
            # Fused fast paths (nn.TransformerEncoderLayer in inference) skip the attention
            # module's forward; they stand down when any submodule has a forward hook.
            parent.register_forward_pre_hook(_keep_slow_path)

    def register_weights_hook(self, fn: Callable) -> Callable[[], None]:
        """Observe the new attention weights: fn(weights, visible). Returns a remover."""
        self.hooks.append(fn)
        return lambda: self.hooks.remove(fn)

    def run(self, parent: nn.Module, *args, **kwargs):
        """The class forward under :class:`AttentionRewrite`; a forward that never reached an
        attention softmax is an error (its softmax could not have been swapped)."""
        mode = AttentionRewrite(self.spec, parent.training, self.hooks)
        with mode:
            out = type(parent).forward(parent, *args, **kwargs)
        self.last_stats = mode.stats
        if mode.stats.rewritten == 0:
            raise RuntimeError(
                f"swapped attention {type(parent).__name__} ran without an attention softmax or "
                f"scaled_dot_product_attention call (its softmax was swapped for {self.spec.kind}); "
                "an attention backend that bypasses torch ops (e.g. flash-attention kernels) cannot be "
                "swapped: use attn_implementation='eager' or 'sdpa'")
        return out

    def extra_repr(self) -> str:
        s = self.spec
        if s.kind == "stablemax":
            return "softmax -> stablemax"
        if s.reweight:
            return f"softmax -> softplus (LSSAR p={s.p:g}, reweight_at_train={s.reweight_at_train})"
        return "softmax -> softplus (LSSA)"


def _keep_slow_path(module: nn.Module, args: Any) -> None:
    return None


def _no_nested_tensors(model: nn.Module, path: str) -> None:
    """nn.TransformerEncoder may turn padded inputs into nested tensors before its layers run;
    the swapped attention needs dense tensors and an explicit padding mask."""
    parts = path.split(".")
    for i in range(len(parts)):
        anc = model.get_submodule(".".join(parts[:i]))
        if isinstance(anc, nn.TransformerEncoder):
            anc.use_nested_tensor = False
            anc.enable_nested_tensor = False


def install(module: nn.Module, spec: NormaliserSpec) -> AttentionSwap:
    marker = AttentionSwap(spec)
    marker.surgery_attach(module)
    return marker


def is_swapped(module: nn.Module) -> bool:
    return isinstance(module._modules.get(MARKER), AttentionSwap)


def attach_swaps(model: nn.Module) -> list[str]:
    """Re-install every swap recorded by an ``attention_swap`` marker (after a load)."""
    paths = []
    for path, mod in model.named_modules():
        marker = mod._modules.get(MARKER)
        if isinstance(marker, AttentionSwap):
            marker.surgery_attach(mod)
            _no_nested_tensors(model, path)
            paths.append(path)
    return paths


# -- tracing on example inputs -------------------------------------------------------------------

_TENSOR_ARGS = ("hidden_states", "x", "query", "key", "value", "src", "tgt", "memory", "input", "inputs",
                "q", "k", "v", "inp")
_OPTIONAL_ARGS = ("attention_mask", "mask", "attn_mask", "src_mask", "key_padding_mask")


class CannotSynthesise(Exception):
    """Example inputs for a forward signature could not be built from the module alone."""


def _embed_dim(module: nn.Module) -> int:
    for name in ("embed_dim", "hidden_size", "d_model"):
        v = getattr(module, name, None)
        if isinstance(v, int):
            return v
    cfg = getattr(module, "config", None)
    if cfg is not None and isinstance(getattr(cfg, "hidden_size", None), int):
        return cfg.hidden_size
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention):
            return sub.embed_dim
        if isinstance(sub, nn.Linear):
            return sub.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # norms: the width is the weight's size
        return weight.shape[0]
    raise CannotSynthesise("cannot tell the model width (no embed_dim, config.hidden_size or Linear)")


def _head_dim(module: nn.Module, width: int) -> int:
    hd = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if isinstance(hd, int):
        return hd
    cfg = getattr(module, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if isinstance(getattr(cfg, "head_dim", None), int):
        return cfg.head_dim
    if isinstance(heads, int) and heads > 0:
        return width // heads
    raise CannotSynthesise("cannot tell the head size for position_embeddings")


def example_inputs(module: nn.Module, length: int = 8) -> tuple[list[Any], dict[str, Any]]:
    """Small inputs for ``module.forward`` built from its signature and sizes (works on meta)."""
    first = next(iter(module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    width = _embed_dim(module)
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=dtype)

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name == "position_embeddings":
            hd = _head_dim(module, width)
            value: Any = (torch.ones(1, length, hd, dtype=dtype, device=device),
                          torch.zeros(1, length, hd, dtype=dtype, device=device))
        elif p.name in _TENSOR_ARGS or i == 0:
            value = tensor(1, length, width)
        elif p.name in _OPTIONAL_ARGS:
            value = None
        else:
            raise CannotSynthesise(f"no example value for argument {p.name!r} of {type(module).__name__}.forward")
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = value
        else:
            args.append(value)
    return args, kwargs


def trace_stats(module: nn.Module, spec: NormaliserSpec, args: list[Any], kwargs: dict[str, Any]) -> Stats:
    """Run ``module`` once under the rewrite and say what it found (no state is changed)."""
    mode = AttentionRewrite(spec, module.training, [])
    with torch.no_grad(), mode:
        type(module).forward(module, *args, **kwargs)
    return mode.stats


def no_attention_reason(module: nn.Module, stats: Stats) -> str | None:
    """None when the trace found attention; else the message for the user."""
    if stats.rewritten > 0 and (stats.weighted_sums > 0 or stats.sdpa > 0):
        return None
    name = type(module).__name__
    if stats.rewritten > 0:
        return f"no attention softmax found in {name}: its softmax output is not multiplied by values"
    if stats.unmatched_softmax:
        return (f"no attention softmax found in {name}: it calls softmax {stats.unmatched_softmax} time(s), "
                "but not over query-key scores along the last dimension")
    return f"no attention softmax found in {name}"


def capture_inputs(model: nn.Module, targets: dict[str, nn.Module], ids: torch.Tensor,
                   **model_kwargs: Any) -> dict[str, tuple]:
    """Run ``model`` on ``ids`` once and record the (args, kwargs) each target is called with."""
    seen: dict[str, tuple] = {}
    handles = []
    for path, mod in targets.items():
        def hook(m, args, kwargs, path=path):
            seen.setdefault(path, (list(args), dict(kwargs)))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            forward_ids(model, ids, **model_kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen
