"""Run a module's forward under a rewrite: the marker-child mechanism shared by the attention swap
and by lowering.

A rewritten module keeps its class, weights and parameter names. It gains a marker child (a
:class:`ForwardRewrite` subclass, a registered module type with no tensors) that records what
the rewrite is, so the manifest carries it and ``surgery.load`` re-inserts it; and its instance
``forward`` is replaced by one that asks the marker to run the class forward (usually under a
``TorchFunctionMode``, see docs/writing-passes.md, "Run-time interception").

A subclass sets ``marker_name`` (the child's attribute name) and implements ``surgery_config`` /
``from_surgery_config`` and :meth:`run`. The base owns attaching (idempotent, also after a load),
uninstalling (a failed gate undoes the step) and the call counters.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn


@dataclass
class Counts:
    kernel: int = 0  # calls that took the rewritten path (e.g. ran a kernel)
    fallback: int = 0  # calls the rewrite did not cover (kept the reference path)


class ForwardRewrite(nn.Module):
    """Marker child of a module whose forward is rewritten; see the module docstring."""

    marker_name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

    # -- to implement ---------------------------------------------------------------------
    def surgery_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "ForwardRewrite":
        raise NotImplementedError

    def run(self, parent: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run ``parent``'s class forward with the rewrite active."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def surgery_attach(self, parent: nn.Module) -> None:
        """Make ``parent``'s forward go through this marker (idempotent; used after load)."""
        if parent._modules.get(self.marker_name) is not self:
            setattr(parent, self.marker_name, self)
        # A partial of a module-level function (not a closure): models stay picklable.
        parent.forward = types.MethodType(functools.partial(_via_marker, self.marker_name), parent)

    def uninstall(self, parent: nn.Module, saved_forward: Any = None) -> None:
        """Undo :meth:`surgery_attach`: drop the marker and restore the instance forward
        (``saved_forward``: what ``parent.__dict__["forward"]`` was before, None for none)."""
        del parent._modules[self.marker_name]
        if saved_forward is None:
            parent.__dict__.pop("forward", None)
        else:
            parent.forward = saved_forward

    @classmethod
    def of(cls, module: nn.Module) -> "ForwardRewrite | None":
        """The marker of this class on ``module``, if any."""
        marker = module._modules.get(cls.marker_name)
        return marker if isinstance(marker, cls) else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError(f"{type(self).__name__} is a marker; call its parent module")


def _via_marker(marker_name: str, parent: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance forward of a rewritten module: its marker runs the class forward."""
    return parent._modules[marker_name].run(parent, *args, **kwargs)
