"""The one registry: passes by (verb, method), and module types that surgery creates.

Built-in passes live in ``surgery.passes``; they are imported lazily on first lookup. Third-party
passes are discovered through the ``surgery.passes`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from surgery.passapi import Pass

_PASSES: dict[tuple[str, str], type["Pass"]] = {}
_MODULE_TYPES: dict[str, type] = {}
_loaded = False

# Built-in pass modules; each registers its passes when imported.
BUILTIN_PASS_MODULES = [
    "surgery.passes",
]


def register(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: add a pass to the registry under (verb, method)."""
    key = (cls.verb, cls.method)
    if not isinstance(getattr(cls, "granularity", None), str):
        raise ValueError(f"pass {cls.verb}/{cls.method} does not declare its granularity "
                         "(granularity = Granularity.TENSOR, BLOCK or MODEL)")
    if key in _PASSES and _PASSES[key] is not cls:
        raise ValueError(f"pass {cls.verb}/{cls.method} registered twice "
                         f"({_PASSES[key].__module__} and {cls.__module__})")
    _PASSES[key] = cls
    return cls


def register_module_type(cls: type) -> type:
    """Class decorator for modules surgery creates, so `surgery.load` can rebuild them.

    The class must provide ``surgery_config() -> dict`` (JSON-serialisable) and a classmethod
    ``from_surgery_config(cfg) -> module`` that builds it with correctly shaped (possibly empty)
    tensors; the saved state dict is then loaded into it.
    """
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def ensure_loaded() -> None:
    """Import the built-in and entry-point passes (once); they register themselves."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_PASS_MODULES:
        importlib.import_module(mod)
    for ep in metadata.entry_points(group="surgery.passes"):
        obj = ep.load()  # importing registers; an entry point may also name a Pass class
        if isinstance(obj, type) and hasattr(obj, "verb") and hasattr(obj, "method"):
            register(obj)


def get_pass(verb: str, method: str) -> type["Pass"] | None:
    ensure_loaded()
    return _PASSES.get((verb, method))


def default_pass(verb: str) -> type["Pass"] | None:
    ensure_loaded()
    for (v, _), cls in _PASSES.items():
        if v == verb and cls.is_default:
            return cls
    return None


def methods_for(verb: str) -> list[str]:
    ensure_loaded()
    return sorted(m for (v, m) in _PASSES if v == verb)


def all_passes() -> list[type["Pass"]]:
    ensure_loaded()
    return [
        _PASSES[k] for k in sorted(_PASSES)
    ]


def module_type(name: str) -> type | None:
    ensure_loaded()
    return _MODULE_TYPES.get(name)


def surgery_modules(root: "nn.Module") -> dict[str, dict[str, Any]]:
    """Every module under ``root`` whose type surgery created, with its rebuild config."""
    out = {}
    for path, mod in root.named_modules():
        if type(mod).__name__ in _MODULE_TYPES and type(mod) is _MODULE_TYPES[type(mod).__name__]:
            out[path] = {"type": type(mod).__name__, "config": mod.surgery_config()}
    return out
