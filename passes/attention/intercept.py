"""Dataflow-level rewrite of the attention softmax while a swapped module runs.

A :class:`torch.overrides.TorchFunctionMode` sees every torch call made by the module's forward
(the same hook torch.fx's tracer uses), so the module is traced as it actually runs: any input
shapes, KV caches, masks given or omitted, eager or SDPA attention. While it runs we keep the
dataflow of the attention pattern

    scores = a @ b            (matmul / bmm / baddbmm; a: (..., L, D), b: (..., D, S))
           -> * or / scale    (optional, any number)
           -> + mask          (optional: additive tensors, masked_fill, where)
           -> softmax(dim=-1) -> [dropout] -> @ v

and replace the softmax node by the new normaliser computed from the pattern's pieces: masked
positions come from the mask nodes (so they get exactly zero weight), the score operands give LSSA
its cosine form. ``scaled_dot_product_attention`` is decomposed into the same pattern first.
Python-level composites that dispatch as one function (``F.multi_head_attention_forward``) are run
with the mode still active so their inner ops are seen.
"""

from __future__ import annotations

import functools
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import functional as AF

_T = torch.Tensor
WEIGHTS = "weights"  # fact for tensors holding the new attention weights


@dataclass
class Scores:
    """Dataflow facts about a tensor that holds attention logits."""

    a: _T  # left matmul operand (..., L, D)
    b: _T  # right matmul operand (..., D, S)
    bias: list[_T] = field(default_factory=list)  # additive tensors (masks and biases)
    masked: list[_T] = field(default_factory=list)  # bool tensors, True = masked out

    def derive(self, **changes: Any) -> "Scores":
        return Scores(self.a, self.b, list(changes.get("bias", self.bias)), list(changes.get("masked", self.masked)))


@dataclass
class NormaliserSpec:
    """What replaces softmax. kind: "stablemax" or "softplus"."""

    kind: str
    reweight: bool = False
    p: float = 15.0
    eps: float = 1e-8
    offset_rows: int = 3
    fallback_on_empty: bool = True
    reweight_at_train: bool = True


@dataclass
class Stats:
    rewritten: int = 0  # softmax nodes replaced
    sdpa: int = 0  # scaled_dot_product_attention calls decomposed
    weighted_sums: int = 0  # replaced weights consumed by a matmul with values
    unmatched_softmax: int = 0  # softmax calls whose input is not attention logits


_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}
_SCALE = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul_,
          torch.Tensor.__imul__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.div_,
          torch.Tensor.__itruediv__, torch.true_divide}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
        torch.Tensor.__iadd__}
_SUB = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.sub_, torch.Tensor.__isub__}
_FILL = {torch.masked_fill, torch.Tensor.masked_fill, torch.Tensor.masked_fill_}
_SAME = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16,
         torch.Tensor.type_as, torch.Tensor.contiguous, torch.Tensor.clone}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_DROPOUT = {F.dropout, torch.dropout}
_SDPA = {F.scaled_dot_product_attention}
_DISPATCH_NAMES = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _very_negative(value: Any) -> bool:
    """True for a fill value that masks (softmax would give it exactly zero weight)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
        value = float(value)
    if isinstance(value, (int, float)):
        return value <= AF.MASK_THRESHOLD
    return False


@functools.lru_cache(maxsize=None)
def _undispatched(fn: Callable) -> Callable:
    """A copy of a Python composite whose own `has_torch_function` check is off, so calling it under
    the mode runs its body (whose inner torch calls the mode then sees) instead of re-dispatching."""
    glb = dict(fn.__globals__)
    for name in _DISPATCH_NAMES:
        glb[name] = lambda *a, **k: False
    copy = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _is_python_composite(fn: Callable) -> bool:
    code = getattr(fn, "__code__", None)
    return (code is not None and getattr(fn, "__module__", "").startswith("torch.nn.functional")
            and any(n in code.co_names for n in _DISPATCH_NAMES) and fn not in _SOFTMAX and fn not in _DROPOUT)


# A rewrite rule (tinygrad's PatternMatcher style, one line per rule):
#   (torch functions it applies to, predicate(mode, func, args, kwargs) or None, handler).
# ``handler(mode, func, args, kwargs)`` returns the call's result, or NO_MATCH to let the next rule
# (and finally the plain call) handle it. Rules are tried in order; lowering puts its kernel
# rules in front of these (passes/lower/sites.py).
Rule = tuple[frozenset, Callable[..., bool] | None, Callable[..., Any]]
NO_MATCH = object()


def _softmax_rule(mode: "AttentionRewrite", func, args, kwargs):
    return mode._softmax(func, args, kwargs)


def _sdpa_rule(mode: "AttentionRewrite", func, args, kwargs):
    return mode._sdpa(*args, **kwargs)


class AttentionRewrite(TorchFunctionMode):
    """Active while a swapped module runs; see the module docstring.

    ``rules`` replaces :attr:`RULES` (lowering passes its kernel rules + ``RULES``);
    ``normaliser(mode, logits, fact, visible, bias)`` replaces :meth:`reference_normalise`.
    """

    RULES: list[Rule] = [
        (frozenset(_SOFTMAX), None, _softmax_rule),  # softmax(scores, -1) -> new normaliser
        (frozenset(_SDPA), None, _sdpa_rule),  # sdpa -> matmul, scale, mask, normaliser, matmul
    ]

    def __init__(self, spec: NormaliserSpec, training: bool, hooks: list[Callable] | None = None,
                 rules: list[Rule] | None = None, normaliser: Callable[..., _T] | None = None):
        super().__init__()
        self.spec = spec
        self.training = training
        self.hooks = hooks or []
        self.rules = self.RULES if rules is None else rules
        self.normaliser = normaliser
        self.stats = Stats()
        self._facts: dict[int, tuple[weakref.ref, Any]] = {}

    # -- provenance table (keyed by tensor identity, checked through a weak reference) --------
    def _get(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self._facts.get(id(t))
        if hit is None or hit[0]() is not t:
            return None
        return hit[1]

    def _set(self, t: Any, fact: Any) -> None:
        if isinstance(t, torch.Tensor):
            self._facts[id(t)] = (weakref.ref(t), fact)

    # -- the handler -----------------------------------------------------------------------
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        for fns, predicate, handler in self.rules:
            if func in fns and (predicate is None or predicate(self, func, args, kwargs)):
                out = handler(self, func, args, kwargs)
                if out is not NO_MATCH:
                    return out
        if _is_python_composite(func):
            with self:
                return _undispatched(func)(*args, **kwargs)
        out = func(*args, **kwargs)
        self._track(func, args, kwargs, out)
        return out

    def _track(self, func, args, kwargs, out) -> None:
        if func in _MATMUL:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
            if self._get(a) is WEIGHTS:
                self.stats.weighted_sums += 1
            elif (isinstance(a, _T) and isinstance(b, _T) and a.dim() >= 2 and b.dim() >= 2
                  and self._get(a) is None and self._get(b) is None):
                self._set(out, Scores(a, b))
        elif func in _BADDBMM:
            inp, b1, b2 = args[:3]
            beta = kwargs.get("beta", 1)
            alpha = kwargs.get("alpha", 1)
            if alpha != 0:
                bias = [inp * beta] if isinstance(inp, _T) and beta != 0 else []
                self._set(out, Scores(b1, b2, bias=bias))
        elif func in _SCALE or func in _SAME:
            src = self._get(args[0])
            if isinstance(src, Scores) or src is WEIGHTS:
                self._set(out, src)
            elif func in _SCALE and len(args) > 1 and isinstance(self._get(args[1]), Scores):
                pass  # x / scores is not an attention logit
        elif func in _ADD or func in _SUB:
            x, y = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            fx, fy = self._get(x), self._get(y)
            sign = -1 if func in _SUB else 1
            if isinstance(fx, Scores) and not isinstance(fy, Scores):
                if isinstance(y, _T):
                    alpha = kwargs.get("alpha", 1)
                    self._set(out, fx.derive(bias=fx.bias + [y * (sign * alpha)]))
                else:
                    self._set(out, fx)
            elif isinstance(fy, Scores) and not isinstance(fx, Scores) and func in _ADD:
                self._set(out, fy.derive(bias=fy.bias + [x] if isinstance(x, _T) else fy.bias))
        elif func in _FILL:
            x, mask, value = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("value")
            fx = self._get(x)
            if isinstance(fx, Scores):
                if _very_negative(value):
                    self._set(out, fx.derive(masked=fx.masked + [mask]))
        elif func is torch.where and len(args) == 3:
            cond, x, y = args
            fx, fy = self._get(x), self._get(y)
            if isinstance(fx, Scores) and _very_negative(y):
                self._set(out, fx.derive(masked=fx.masked + [~cond]))
            elif isinstance(fy, Scores) and _very_negative(x):
                self._set(out, fy.derive(masked=fy.masked + [cond]))
        elif func in _DROPOUT:
            if self._get(args[0]) is WEIGHTS:
                self._set(out, WEIGHTS)

    # -- the rewrite ------------------------------------------------------------------------
    def _softmax(self, func, args, kwargs):
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        dtype = kwargs.get("dtype", args[2] if func is torch.softmax and len(args) > 2 else None)
        if func is F.softmax and len(args) > 3:
            dtype = args[3]
        fact = self._get(x)
        last = dim is not None and (dim == -1 or dim == x.dim() - 1)
        if not (isinstance(fact, Scores) and last):
            self.stats.unmatched_softmax += 1
            out = func(*args, **kwargs)
            return out
        visible, bias = self._mask_of(fact)
        weights = self._normalise(x, fact, visible, bias)
        out_dtype = dtype if dtype is not None else x.dtype
        weights = weights.to(out_dtype)
        self.stats.rewritten += 1
        for hook in self.hooks:
            hook(weights, visible)
        self._set(weights, WEIGHTS)
        return weights

    def _mask_of(self, fact: Scores) -> tuple[_T | None, _T | None]:
        visible, bias = None, None
        for m in fact.bias:
            vis, fin = AF.visible_from_mask(m)
            visible = vis if visible is None else visible & vis
            if fin is not None:
                bias = fin if bias is None else bias + fin
        for m in fact.masked:
            visible = ~m if visible is None else visible & ~m
        return visible, bias

    def _normalise(self, logits: _T, fact: Scores, visible: _T | None, bias: _T | None) -> _T:
        if self.normaliser is not None:
            return self.normaliser(self, logits, fact, visible, bias)
        return self.reference_normalise(logits, fact, visible, bias)

    def reference_normalise(self, logits: _T, fact: Scores, visible: _T | None,
                            bias: _T | None) -> _T:
        """The new attention weights in plain PyTorch (functional.py)."""
        spec = self.spec
        if spec.kind == "stablemax":
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            return AF.stablemax_weights(logits.to(acc), visible)
        reweight = spec.reweight and (spec.reweight_at_train or not self.training)
        if visible is not None:
            visible = visible.expand(logits.shape)
        w = AF.softplus_weights(fact.a, fact.b, visible, bias, reweight=reweight, p=spec.p, eps=spec.eps,
                                offset_rows=spec.offset_rows, fallback_on_empty=spec.fallback_on_empty)
        if w.shape != logits.shape:
            raise RuntimeError(f"attention logits of shape {tuple(logits.shape)} are not the product of "
                               f"{tuple(fact.a.shape)} and {tuple(fact.b.shape)}")
        return w

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        """scaled_dot_product_attention decomposed: matmul -> scale -> mask -> (new) softmax -> matmul."""
        self.stats.sdpa += 1
        k, v = AF._gqa(query, key, value)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        logits = (query.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
        fact = Scores(query, k.transpose(-2, -1))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                fact.masked.append(~attn_mask)
            else:
                fact.bias.append(attn_mask)
                logits = logits + AF.visible_from_mask(attn_mask)[1].to(acc)
        if is_causal:
            fact.masked.append(~AF.causal_visible(query.shape[-2], k.shape[-2], query.device))
        visible, bias = self._mask_of(fact)
        weights = self._normalise(logits, fact, visible, bias)
        self.stats.rewritten += 1
        for hook in self.hooks:
            hook(weights, visible)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p, training=True)
        self.stats.weighted_sums += 1
        return (weights @ v.to(weights.dtype)).to(query.dtype)
