"""A model whose weights live in a checkpoint until needed.

The skeleton is built from config.json with its parameters on the meta device and its
non-persistent buffers (rotary frequencies ...) real, so a forward through the modules that are
resident works. A *unit* is a set of module paths that are onloaded and offloaded together: each
repeated block, and each module outside the blocks that holds weights (tied modules share one
unit). Onloading reads the unit's tensors from the checkpoint (stored dtype), moves them to the
compute device and dtype; offloading hands back the unit's state dict and returns it to meta.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from surgery.diagnostics import error
from surgery.executor.checkpoint import Checkpoint


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters (no memory, no init cost) but real buffers."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config: dict) -> nn.Module:
    """The architecture of ``config`` with meta parameters and real buffers, in fp32."""
    from surgery.models import _hf_config, _model_class, _quiet

    cls = _model_class(config)
    try:
        with _quiet(), params_on_meta():
            model = cls._from_config(_hf_config(config), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a config transformers refuses
        raise error("E0603", f"cannot build the model from its config.json: "
                             f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}")
    model.eval()
    return model


def _direct_state(module: nn.Module) -> list[str]:
    persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
    return [n for n, p in module._parameters.items() if p is not None] + \
        [n for n in persistent if module._buffers[n] is not None]


def _owners(model: nn.Module) -> list[str]:
    """Paths of modules holding parameters or persistent buffers directly."""
    return [p for p, m in model.named_modules() if _direct_state(m)]


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _put(mod: nn.Module, name: str, t: torch.Tensor) -> None:
    if name in mod._parameters:
        mod._parameters[name] = t
    else:
        mod._buffers[name] = t


def _meta_like(mod: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, requires_grad=False) if name in mod._parameters else meta


def release(module: nn.Module, keep: nn.Module) -> None:
    """Return the tensors of ``module`` (a module a step has just replaced by ``keep``) to meta,
    except those ``keep`` still uses (a bias carried over, a base layer it wraps). Whoever still
    holds the old module (a pass's target dict) then holds no weights: offloading a unit only
    reaches the modules in the model."""
    used = {id(t) for t in list(keep.parameters()) + list(keep.buffers())}
    kept = {id(m) for m in keep.modules()}
    for mod in module.modules():
        if id(mod) in kept:
            continue
        for name in _direct_state(mod):
            t = getattr(mod, name)
            if t.device.type != "meta" and id(t) not in used:
                _put(mod, name, _meta_like(mod, name, t))


@dataclass
class Unit:
    name: str  # the block path, or the first member's path
    paths: list[str]  # modules whose whole subtree belongs to the unit
    is_block: bool


def plan_units(model: nn.Module, blocks: list[str]) -> list[Unit]:
    """Every block, then every weight-holding module outside the blocks (tied ones together),
    so that each state-dict entry belongs to exactly one unit."""
    units = [Unit(b, [b], True) for b in blocks]
    outside = [p for p in _owners(model) if not any(_inside(p, b) for b in blocks)]
    # an owner nested in another owner goes with the outer one
    outside = [p for p in outside if not any(p != q and _inside(p, q) for q in outside)]
    # tied parameters: their owners form one unit
    by_param: dict[int, str] = {}
    merged: dict[str, list[str]] = {}
    for p in outside:
        mod = model.get_submodule(p) if p else model
        root = None
        for t in mod.parameters():
            if id(t) in by_param:
                root = by_param[id(t)]
                break
        if root is None:
            merged[p] = [p]
            root = p
        else:
            merged[root].append(p)
        for t in mod.parameters():
            by_param.setdefault(id(t), root)
    units += [Unit(k or "<root>", v, False) for k, v in merged.items()]
    return units


@dataclass
class Resident:
    """The streamed model: ``model`` (meta where not resident), its checkpoint, the device and
    compute dtype of onloaded tensors."""

    model: nn.Module
    checkpoint: Checkpoint
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # checkpoint name for each state-dict name whose tensor is stored under another name (tied)
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        groups: dict[int, list[str]] = {}
        for n, t in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(t), []).append(n)
        for names in groups.values():
            stored = next((n for n in names if n in self.checkpoint), None)
            for n in names:
                if n not in self.checkpoint and stored is not None:
                    self.aliases[n] = stored
        if self.device.type != "cpu":
            for mod in self.model.modules():
                for k, b in mod._buffers.items():
                    if b is not None and b.device.type != "meta":
                        mod._buffers[k] = b.to(self.device)

    def key(self, name: str) -> str:
        if name in self.checkpoint:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise error("E0603", f"the checkpoint has no tensor `{name}`",
                    help="the checkpoint does not match its config.json")

    def _convert(self, t: torch.Tensor, stored: bool = False) -> torch.Tensor:
        if t.is_floating_point() and not stored:
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(self.device)

    def onload(self, unit: Unit, stored: bool = False) -> None:
        """Read ``unit`` from the checkpoint; in the compute dtype, or with ``stored`` in the
        dtype it is stored in (for a unit only read, never transformed)."""
        done: dict[int, torch.Tensor] = {}  # old meta tensor -> its onloaded replacement (ties)
        for path in unit.paths:
            root = self.model.get_submodule(path) if path else self.model
            for mpath, mod in root.named_modules(prefix=path):
                for name in _direct_state(mod):
                    cur = getattr(mod, name)
                    if id(cur) in done:
                        new = done[id(cur)]
                    elif cur.device.type != "meta":
                        continue
                    else:
                        full = f"{mpath}.{name}" if mpath else name
                        t = self._convert(self.checkpoint.read(self.key(full)), stored)
                        if tuple(t.shape) != tuple(cur.shape):
                            raise error("E0603", f"`{full}` has shape {tuple(t.shape)} in the "
                                                 f"checkpoint but {tuple(cur.shape)} in "
                                                 "config.json")
                        new = nn.Parameter(t, requires_grad=False) \
                            if name in mod._parameters else t
                        done[id(cur)] = new
                    _put(mod, name, new)

    def state(self, unit: Unit) -> dict[str, torch.Tensor]:
        """The unit's state dict (full names), as it is now."""
        out: dict[str, torch.Tensor] = {}
        for path in unit.paths:
            mod = self.model.get_submodule(path) if path else self.model
            prefix = f"{path}." if path else ""
            out.update({prefix + k: v for k, v in mod.state_dict().items()})
        return out

    def offload(self, unit: Unit) -> None:
        """Return the unit to meta (its tensors are freed once no one else holds them)."""
        done: dict[int, torch.Tensor] = {}
        for path in unit.paths:
            root = self.model.get_submodule(path) if path else self.model
            for mod in root.modules():
                for name in _direct_state(mod):
                    cur = getattr(mod, name)
                    if cur.device.type == "meta":
                        continue
                    if id(cur) not in done:
                        done[id(cur)] = _meta_like(mod, name, cur)
                    _put(mod, name, done[id(cur)])

    def resident(self, unit: Unit) -> bool:
        for path in unit.paths:
            mod = self.model.get_submodule(path) if path else self.model
            for t in list(mod.parameters()) + list(mod.buffers()):
                if t.device.type == "meta":
                    return False
        return True
