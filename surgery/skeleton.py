"""Structural skeletons: a model's module tree rebuilt on the meta device without its code.

Planning needs module paths, class names (for `type(...)` selectors), parameter shapes and a few
attributes such as ``in_features``. Building the real skeleton from config.json needs the
architecture's Python code, and for transformers models importing it costs seconds (torch
distributed, dynamo, ...). So the first real build is *described* (a JSON of the module tree) and
cached; later plans rebuild the same tree from the description:

- torch's own module classes (``nn.Linear``, ``nn.Embedding``, ...) are rebuilt as real instances
  of those classes, with their simple attributes and meta-device parameters, so pass checks that
  read ``in_features`` or call them on meta tensors behave exactly as on the real skeleton;
- every other class (``LlamaAttention``, ...) becomes a stand-in class of the same name, module and
  nn.Module base chain, so `type(...)` selectors match the same modules. Stand-ins have no
  ``forward``: passes whose plan-time checks run the model's code declare ``plan_needs_code``
  and get the real skeleton instead.

The cache key covers the config, the class to build, and the torch/transformers versions, so a
description never outlives the code it describes.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.atomic import atomic_file
from surgery.paths import cache_root
from surgery.tying import tied_names

FORMAT = 1
_SIMPLE = (bool, int, float, str, type(None))
_INTERNAL = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def _is_torch_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "torch"


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _simple(value: Any) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)


def _tensor_entry(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype).removeprefix("torch.")]


def describe(model: nn.Module) -> dict:
    """The JSON description of ``model``'s module tree (no tensor data)."""
    classes: dict[str, dict] = {}

    def note_class(cls: type) -> str:
        key = _class_key(cls)
        if key in classes or cls is nn.Module:
            return key
        bases = [b for b in cls.__bases__ if issubclass(b, nn.Module)]
        classes[key] = {"name": cls.__name__, "module": cls.__module__,
                        "qualname": cls.__qualname__, "torch": _is_torch_class(cls),
                        "bases": [note_class(b) for b in bases]}
        return key

    modules = []
    for path, mod in model.named_modules(remove_duplicate=False):
        attrs = {}
        for k, v in vars(mod).items():
            if k in _INTERNAL or k.startswith("_forward") or k.startswith("_backward"):
                continue
            if k.endswith("hooks") or k.endswith("hooks_with_kwargs") or k.endswith("_always_called"):
                continue
            if _simple(v):
                attrs[k] = list(v) if isinstance(v, tuple) else v
                if isinstance(v, tuple):
                    attrs.setdefault("__tuples__", []).append(k)
        non_persistent = mod._non_persistent_buffers_set
        modules.append({
            "path": path,
            "class": note_class(type(mod)),
            "attrs": attrs,
            # None entries (Linear(bias=False).bias) are kept: attribute lookups depend on them.
            "params": {n: p if p is None else _tensor_entry(p) for n, p in mod._parameters.items()},
            "buffers": {n: b if b is None else _tensor_entry(b) + [n not in non_persistent]
                        for n, b in mod._buffers.items()},
            "children": list(mod._modules),
        })
    # Tied or shared modules appear once per path; rebuilding shares them the same way.
    ids: dict[int, str] = {}
    for entry, (_, mod) in zip(modules, model.named_modules(remove_duplicate=False)):
        first = ids.setdefault(id(mod), entry["path"])
        if first != entry["path"]:
            entry["alias_of"] = first
    # Tied parameters (lm_head.weight is embed_tokens.weight) are recorded as aliases too.
    tied = tied_names(model.named_parameters(remove_duplicate=False))
    return {"format": FORMAT, "classes": classes, "modules": modules, "tied": tied}


class _StandIn:
    """Marker mixed into every stand-in class (``is_structural`` tests for it)."""


def _standin_classes(classes: dict[str, dict]) -> dict[str, type]:
    import importlib

    built: dict[str, type] = {}

    def build(key: str) -> type:
        if key in built:
            return built[key]
        info = classes.get(key)
        if info is None:  # nn.Module itself
            return nn.Module
        if info["torch"]:
            obj: Any = importlib.import_module(info["module"])
            for part in info["qualname"].split("."):
                obj = getattr(obj, part)
            built[key] = obj
            return obj
        bases = tuple(build(b) for b in info["bases"]) or (nn.Module,)
        if not any(issubclass(b, _StandIn) for b in bases):
            bases += (_StandIn,)
        cls = type(info["name"], bases,
                   {"__module__": info["module"], "__qualname__": info["qualname"],
                    "__doc__": f"structural stand-in for {info['module']}.{info['qualname']}"})
        built[key] = cls
        return cls

    for key in classes:
        build(key)
    return built


def _meta(shape: list[int], dtype: str) -> torch.Tensor:
    return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")


def _module(cls: type, entry: dict) -> nn.Module:
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    tuples = set(entry["attrs"].get("__tuples__", ()))
    for k, v in entry["attrs"].items():
        if k != "__tuples__":
            object.__setattr__(mod, k, tuple(v) if k in tuples else v)
    for n, p in entry["params"].items():
        mod._parameters[n] = None if p is None else nn.Parameter(_meta(*p))
    for n, b in entry["buffers"].items():
        if b is None:
            mod._buffers[n] = None
        else:
            mod.register_buffer(n, _meta(*b[:2]), persistent=b[2])
    return mod


def build(description: dict) -> nn.Module:
    """Rebuild the module tree of ``description`` on the meta device."""
    classes = _standin_classes(description["classes"])
    by_path: dict[str, nn.Module] = {}
    entries = description["modules"]
    for entry in entries:
        if "alias_of" not in entry:
            by_path[entry["path"]] = _module(classes[entry["class"]], entry)
    for entry in entries:  # a module shared under several paths is one object
        if "alias_of" in entry:
            by_path[entry["path"]] = by_path[entry["alias_of"]]
    for entry in entries:
        if "alias_of" in entry:
            continue
        prefix = f"{entry['path']}." if entry["path"] else ""
        mod = by_path[entry["path"]]
        for child in entry["children"]:
            mod._modules[child] = by_path.get(prefix + child)
    root = by_path[""]
    for name, first in description.get("tied", {}).items():
        owner, _, attr = name.rpartition(".")
        src_owner, _, src_attr = first.rpartition(".")
        root.get_submodule(owner)._parameters[attr] = \
            root.get_submodule(src_owner)._parameters[src_attr]
    root.eval()
    return root


def is_structural(module: nn.Module) -> bool:
    return isinstance(module, _StandIn)


# ---------------------------------------------------------------------------------------------
# the cache

def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def cache_key(config: dict) -> str:
    """Config, torch and transformers versions and the description format, hashed."""
    blob = json.dumps({"config": config, "torch": torch.__version__,
                       "transformers": _version("transformers"), "format": FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    return cache_root() / "skeletons"


# Descriptions of the zoo models ship with the package (regenerate: python -m surgery.skeleton_zoo);
# they are used only while the installed torch and transformers match the ones that wrote them.
SHIPPED = Path(__file__).parent / "zoo" / "skeletons"


def cached(config: dict) -> nn.Module | None:
    """The structural skeleton for ``config`` if a description is cached, else None."""
    name = f"{cache_key(config)}.json"
    for path in (cache_dir() / name, SHIPPED / name):
        try:
            return build(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # absent or unreadable: try the next, then build the real skeleton
    return None


def store(config: dict, model: nn.Module) -> None:
    """Describe ``model`` into the cache (best effort: planning works without it)."""
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        with atomic_file(d / f"{cache_key(config)}.json") as tmp:
            tmp.write_text(json.dumps(describe(model)))
    except OSError:
        pass

