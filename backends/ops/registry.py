"""One record per ``surgery::`` custom op: everything the backends and the lowering pass need.

An op is defined in one file under backends/ops/ (its ``torch.library.custom_op``, fake and
autograd registrations, plain-PyTorch reference), and that file registers its :class:`Op`:

    register_op(Op("stablemax", reference=stablemax_reference,
                   kernel=Lazy("surgery.backends.triton.stablemax:stablemax_forward", log=False),
                   covers=float_kernel_dtypes,
                   onnx="surgery.backends.onnx.translations_kernels:stablemax",
                   sites=(("generic", None), ("attention", "stablemax"))))

Readers, each of which used to keep its own table:

* the Triton backend (backends/triton/registry.py): ``kernel`` for inputs ``covers`` accepts,
  ``reference`` for the rest, and the CUDA registration of every op with a kernel;
* ONNX export (backends/onnx/translations.py): ``onnx`` names the onnxscript translation;
* the lowering pass (passes/lower): ``sites`` says where `lower OPS to triton` finds the op, as
  (kind, key) pairs: ("quant", bits) a quantized linear layer with that many bits;
  ("attention", normaliser) a swapped attention module with that normaliser kind;
  ("generic", None) calls made by any selected module. An op without sites (a backward) cannot
  be named in `lower`.

Kernels and translations are named as ``"module:function"`` strings and imported on first use:
they need optional packages (triton, onnxscript), and their modules import the ops, so a direct
import here would be a cycle.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Dtypes the Triton kernels are written for; other inputs (float64) take the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SITES = ("quant", "attention", "generic")


@dataclass(frozen=True)
class Lazy:
    """A function named by ``"module:function"``, imported when first called or resolved;
    ``kwargs`` are bound keyword arguments (e.g. ``log=False``)."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, target: str, **kwargs: Any):
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "kwargs", kwargs)

    def resolve(self) -> Callable:
        module, _, name = self.target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        if not self.kwargs:
            return fn
        bound = self.kwargs
        return lambda *args: fn(*args, **bound)

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*args)


def float_kernel_dtypes(x: torch.Tensor, *rest: Any) -> bool:
    """The usual coverage rule: the first input has a kernel dtype."""
    return x.dtype in KERNEL_DTYPES


@dataclass(frozen=True)
class Op:
    name: str  # torch.ops.surgery.<name>
    reference: Callable  # plain PyTorch, same arguments as the op: the fallback and the oracle
    kernel: Callable | None = None  # the Triton launcher (usually a Lazy)
    covers: Callable[..., bool] = float_kernel_dtypes  # does the kernel cover these inputs?
    onnx: str | None = None  # "module:function" of the onnxscript translation
    sites: tuple[tuple[str, Any], ...] = ()  # (kind in SITES, key): where `lower` finds calls

    def __post_init__(self):
        for kind, _ in self.sites:
            if kind not in SITES:
                raise ValueError(f"op {self.name}: site kind must be one of {SITES}, not {kind!r}")

    @property
    def overload(self):
        """The op's default overload (what traced graphs and ONNX translation tables key on)."""
        return getattr(torch.ops.surgery, self.name).default


_OPS: dict[str, Op] = {}
_loaded = False


def register_op(op: Op) -> Op:
    """Record ``op`` (called by the file that defines it)."""
    _OPS[op.name] = op
    return op


def _load_all() -> None:
    """Import every op module of this package, so their records exist (adding an op file is
    enough; no list to extend)."""
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("surgery.backends.ops")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"surgery.backends.ops.{info.name}")
    _loaded = True


def all_ops() -> dict[str, Op]:
    """name -> Op for every defined op."""
    _load_all()
    return dict(_OPS)


def get_op(name: str) -> Op:
    return all_ops()[name]


def lowerable_ops() -> tuple[str, ...]:
    """Names `lower OPS to triton` accepts, sorted."""
    return tuple(sorted(name for name, op in all_ops().items() if op.sites))


def ops_at(kind: str, key: Any = None) -> list[str]:
    """Names of the ops lowered at sites of ``kind`` with ``key``, sorted."""
    return sorted(name for name, op in all_ops().items() if (kind, key) in op.sites)
