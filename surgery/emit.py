"""Saving and loading transformed models: an HF directory + the `surgery.json` manifest.

Layout of a saved directory::

    config.json           the base architecture's config (HF models), with compressed-tensors'
                          quantization_config when layers are quantized
    model.safetensors     the weights as plain transformers reads them (tied duplicates once)
    surgery.safetensors   surgery-only state (masks, permutations), or all weights when the
                          model has surgery-only modules (then config.json makes transformers
                          refuse the directory); see surgery/deploy/hf_dir.py
    tokenizer files       when the model has a tokenizer (chat template included)
    surgery.json          how it was made: script, input hashes, plan, versions, per-step reports,
                          the surgery-made module types to rebuild, tied-tensor aliases

Writes go to a temporary directory that is renamed into place, so a crash leaves either no
artifact or the complete new one. Outputs are deterministic: same inputs, same bytes.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from surgery import registry
from surgery.atomic import atomic_dir
from surgery.deploy import hf_dir
from surgery.diagnostics import SurgeryError, error
from surgery.passapi import replace_module
from surgery.tying import tied_names

if TYPE_CHECKING:  # pragma: no cover
    from surgery.binder import Plan
    from surgery.data import Dataset
    from surgery.models import LoadedModel

MANIFEST = "surgery.json"
PROVENANCE = "provenance"  # the ctx.extras key under which the runner passes the Provenance
# ctx.extras keys: the input's stored dtype per tensor name (bf16 in -> bf16 out), and the
# largest output shard in bytes (`--max-shard-size`).
STORED_DTYPES = "stored_dtypes"
MAX_SHARD = "max_shard_bytes"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import surgery

    out = {"surgery": surgery.__version__, "torch": torch.__version__,
           "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


@dataclass
class Provenance:
    """What a saved model records about how it was made; the runner fills it as it goes."""

    plan: "Plan"
    seed: int
    inputs: dict[str, Any]  # model name -> {"source", "files": {name: sha256}}
    data: dict[str, "Dataset"] = field(default_factory=dict)
    steps: list[Any] = field(default_factory=list)  # runner.StepRecord, in order
    expectations: list[Any] = field(default_factory=list)  # expectations.ExpectationRecord
    tokenizer: Any = None


def manifest(prov: Provenance) -> dict[str, Any]:
    """The `surgery.json` fields that describe the run (save adds versions, module types ...).
    Step times are left out, so the same run writes the same bytes."""
    program = prov.plan.program
    return {"script": program.source.text, "script_name": program.source.name,
            "seed": prov.seed, "inputs": prov.inputs,
            "data": {n: {"description": d.description, **d.meta} for n, d in prov.data.items()},
            "plan": prov.plan.to_json(),
            "steps": [s.to_json() | {"seconds": None} for s in prov.steps],
            "expectations": [e.to_json() for e in prov.expectations]}


def input_hashes(loaded: dict[str, "LoadedModel"]) -> dict[str, Any]:
    from surgery.models import sha256_file

    return {name: {"source": lm.source,
                   "files": {Path(f).name: sha256_file(Path(f)) for f in lm.files}}
            for name, lm in loaded.items()}


def split_aliases(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tensors that share storage stored once; alias -> canonical name."""
    state = model.state_dict()
    aliases = tied_names(state)
    tensors = {name: t.detach().contiguous().clone() if not t.is_contiguous() else t.detach()
               for name, t in state.items() if name not in aliases}
    return tensors, aliases


def save(model: nn.Module, path: str | Path, manifest: dict[str, Any], tokenizer=None, *,
         dtypes: dict[str, torch.dtype] | None = None,
         max_shard_bytes: int | None = None) -> Path:
    """Write the model directory atomically. ``dtypes``: the input's stored dtype per tensor
    name; those tensors are written back in it (surgery/deploy/hf_dir.py ``stored``)."""
    tensors, aliases = split_aliases(model)
    modules = registry.surgery_modules(model)
    full = {**manifest, "format_version": FORMAT_VERSION, "versions": versions(),
            "modules": modules, "aliases": aliases,
            "base": _base_info(model)}
    with atomic_dir(path) as tmp:
        # config.json + weights as plain transformers reads them (surgery/deploy/hf_dir.py)
        full["weights"] = hf_dir.write(tmp, model, tensors, modules, dtypes, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    return Path(path)


def _base_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {"kind": "hf", "class": type(model).__name__,
                "architectures": getattr(config, "architectures", None)}
    return {"kind": "python", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def _rebuild_base(d: Path, manifest: dict, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    base = manifest.get("base", {})
    if base.get("kind") != "hf" or not (d / "config.json").exists():
        raise error("E0600", f"`{d}` holds a plain nn.Module ({base.get('class')}); pass a freshly "
                             "built instance to rebuild it",
                    help="surgery.load(DIR, model=MyModel())")
    import transformers
    from surgery.models import _hf_config, _quiet

    config = hf_dir.base_config(json.loads((d / "config.json").read_text()))
    cls = getattr(transformers, base.get("class", ""), None) or transformers.AutoModel
    with _quiet():
        built = cls._from_config(_hf_config(config), dtype=torch.float32)
    return built


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by `save`: base architecture, surgery module types, weights."""
    from safetensors import SafetensorError

    d = Path(path)
    if not (d / MANIFEST).exists():
        raise error("E0602", f"`{d}` is not a surgery output (no {MANIFEST})",
                    help="load plain HF directories with `hf:DIR` in a script or transformers")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise error("E0603", f"{d / MANIFEST} is corrupt: {e.msg}")
    root = _rebuild_base(d, manifest, model)
    for p, info in sorted(manifest.get("modules", {}).items(), key=lambda kv: kv[0].count(".")):
        cls = registry.module_type(info["type"])
        if cls is None:
            raise error("E0600", f"`{d}` uses module type `{info['type']}`, which no installed "
                                 "pass provides", help="install the package that defines it")
        new = cls.from_surgery_config(info["config"])
        replace_module(root, p, new)
        if hasattr(new, "surgery_attach"):  # a marker module that re-wires its parent
            parent_path = p.rpartition(".")[0]
            new.surgery_attach(root.get_submodule(parent_path) if parent_path else root)
    try:
        state = hf_dir.read(d, manifest)
    except SurgeryError:
        raise
    except (SafetensorError, OSError, Exception) as e:  # noqa: B014 - report any corruption
        raise error("E0603", f"cannot read the weights in {d}: {str(e)[:200]}",
                    help="the weights file is corrupt or truncated")
    aliases = manifest.get("aliases", {})
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    try:
        missing, unexpected = root.load_state_dict(state, strict=False, assign=False)
    except RuntimeError as e:  # shape mismatches: the architecture cannot be rebuilt from config
        raise error("E0603", f"weights in `{d}` do not fit the rebuilt architecture: "
                             f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}",
                    help="pass a model built with the right shapes: surgery.load(DIR, model=...)")
    if missing or unexpected:
        raise error("E0603", f"weights do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    _retie(root, aliases)
    root.eval()
    return root


def _retie(root: nn.Module, aliases: dict[str, str]) -> None:
    """Make aliased parameters the same Parameter object again (tied embeddings)."""
    params = dict(root.named_parameters(remove_duplicate=False))
    for alias, canonical in aliases.items():
        if alias in params and canonical in params and params[alias] is not params[canonical]:
            mod_path, _, attr = alias.rpartition(".")
            setattr(root.get_submodule(mod_path) if mod_path else root, attr, params[canonical])
