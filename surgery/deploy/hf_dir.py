"""The weights and config.json of a saved directory, as plain transformers will read them.

Every HF model is saved in one of three layouts (recorded in surgery.json under ``weights``):

- ``hf``: every module has a standard form; ``model.safetensors`` holds plain names (pruned
  layers as dense weights with zeros) and plain ``from_pretrained`` gives our logits.
- ``compressed-tensors``: as ``hf``, with int8/int4 layers in compressed-tensors'
  ``pack-quantized`` form and its ``quantization_config`` in config.json (transformers with the
  ``compressed-tensors`` package, and vLLM, read it).
- ``surgery-only``: some module has no standard form (attention swap, unmerged adapter, ...).
  Loading it in plain transformers would be silently wrong (random or unswapped layers), so the
  weights go to ``surgery.safetensors`` only (no ``model.safetensors`` for an explicit model
  class to pick up) and config.json names a model type transformers refuses, with a pointer to
  ``surgery.load``. The original model type is kept under ``surgery_original``.

State that only surgery needs (masks, act-order permutations) goes to ``surgery.safetensors`` in
the first two layouts; :func:`read` rebuilds our exact state dict from both files.
Plain nn.Modules (no config) keep everything in ``model.safetensors`` (layout ``module``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from surgery.deploy import compressed_tensors as ct
from surgery.deploy import sparse

HF_WEIGHTS = "model.safetensors"
OWN_WEIGHTS = "surgery.safetensors"
REFUSED_MODEL_TYPE = "surgery-only: load this directory with surgery.load(path), see surgery.json"
ORIGINAL = "surgery_original"

# Module types that change how a module runs but not what it computes.
TRANSPARENT = {"TritonLowering"}

# Why a module type has no standard form (shown in surgery.json and the save report).
NO_STANDARD_FORM = {
    "AttentionSwap": "the attention normaliser is swapped; transformers would run softmax",
    "LoraLinear": "an unmerged LoRA adapter; `merge adapters` first or `export peft`",
    "BoneLinear": "an unmerged Bone adapter; `merge adapters` first or `export peft`",
    "ConcatHeads": "two concatenated classifier heads (a merge of different label spaces)",
}


@dataclass
class Converter:
    refusal: Callable[[nn.Module], str | None]
    to_hf: Callable[[nn.Module], tuple[dict, dict]]
    from_hf: Callable[[dict, dict, dict], dict]
    layout: str


CONVERTERS = {
    "QuantLinear": Converter(ct.refusal, ct.to_ct, ct.from_ct, "compressed-tensors"),
    "SparseLinear": Converter(sparse.refusal, sparse.to_dense, sparse.from_dense, "hf"),
}


@dataclass
class View:
    layout: str
    tensors: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)  # path -> module type
    refusals: dict[str, str] = field(default_factory=dict)  # path -> why no standard form


def classify(model: nn.Module, modules: dict[str, dict[str, Any]], hf: bool | None = None
             ) -> tuple[str, dict[str, str], dict[str, str]]:
    """(layout, converted path -> type, refused path -> why) of ``model``'s surgery modules.
    Reads module attributes only, so it works on a meta skeleton (the streamed executor decides
    the layout before any weight is written; ``hf`` overrides the check for a config, which a
    structural plan skeleton lacks)."""
    if not (_is_hf(model) if hf is None else hf):
        return "module", {}, {}
    refusals, converted = {}, {}
    for path, info in modules.items():
        kind = info["type"]
        if kind in TRANSPARENT:
            continue
        conv = CONVERTERS.get(kind)
        why = (conv.refusal(model.get_submodule(path)) if conv is not None else
               NO_STANDARD_FORM.get(kind, f"`{kind}` is a surgery-only module type"))
        if why:
            refusals[path] = f"{kind}: {why}"
        else:
            converted[path] = kind
    if refusals:
        return "surgery-only", converted, refusals
    layouts = {CONVERTERS[k].layout for k in converted.values()} - {"hf"}
    return (layouts.pop() if layouts else "hf"), converted, refusals


def view(model: nn.Module, tensors: dict[str, torch.Tensor],
         modules: dict[str, dict[str, Any]]) -> View:
    """How ``model`` (state ``tensors``, surgery ``modules``) is written for plain transformers."""
    if not _is_hf(model):
        return View("module", tensors)
    layout, converted, refusals = classify(model, modules)
    if refusals:
        return View("surgery-only", tensors, refusals=refusals)
    out = dict(tensors)
    extras: dict[str, torch.Tensor] = {}
    layout = "hf"
    for path, kind in converted.items():
        for k in [k for k in out if k.startswith(path + ".")]:
            del out[k]
        conv = CONVERTERS[kind]
        hf, own = conv.to_hf(model.get_submodule(path))
        out.update({f"{path}.{k}": v for k, v in hf.items()})
        extras.update({f"{path}.{k}": v for k, v in own.items()})
        if conv.layout != "hf":
            layout = conv.layout
    return View(layout, out, extras, converted)


def stored(tensors: dict[str, torch.Tensor],
           dtypes: dict[str, torch.dtype] | None) -> dict[str, torch.Tensor]:
    """``tensors`` with every floating tensor the input checkpoint had under the same name cast
    back to the dtype it was stored in (bf16 in, bf16 out: the in-memory model computes in fp32,
    and a tensor no step touched round-trips exactly). New tensors (scales, masks) keep theirs."""
    if not dtypes:
        return tensors
    out = {}
    for k, t in tensors.items():
        want = dtypes.get(k)
        if want is not None and want.is_floating_point and t.is_floating_point() \
                and t.dtype != want:
            t = t.to(want)
        out[k] = t
    return out


def output_config(model: nn.Module, layout: str,
                  dtypes: dict[str, torch.dtype] | None) -> dict[str, Any] | None:
    """config.json for the output: the model's, refused for surgery-only layouts, with the
    checkpoint's dtype when tensors are written in it."""
    config = model.config.to_dict() if _is_hf(model) else None
    if config is None:
        return None
    floats = [d for d in (dtypes or {}).values() if d.is_floating_point]
    if floats:
        config["dtype"] = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    return refusing_config(config) if layout == "surgery-only" else config


def write_config(directory: Path, config: dict[str, Any] | None) -> None:
    if config is not None:
        (directory / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True, default=str))


def write_quantization(directory: Path, model: nn.Module, converted: dict[str, str]) -> None:
    """compressed-tensors' quantization_config in config.json (works on a meta skeleton)."""
    quantized = {p: model.get_submodule(p) for p, k in converted.items() if k == "QuantLinear"}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ct.write_config(directory, ct.quantization_config(quantized, linears))


def write(directory: Path, model: nn.Module, tensors: dict[str, torch.Tensor],
          modules: dict[str, dict[str, Any]],
          dtypes: dict[str, torch.dtype] | None = None,
          max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write config.json and the weights files; returns the manifest's ``weights`` record.
    ``dtypes``: the input checkpoint's stored dtype per tensor name (see :func:`stored`).
    Weights larger than ``max_shard_bytes`` are written as shards with an index."""
    from safetensors.torch import save_file

    from surgery.executor.writer import DEFAULT_SHARD, ShardWriter

    v = view(model, tensors, modules)
    write_config(directory, output_config(model, v.layout, dtypes))
    main = OWN_WEIGHTS if v.layout == "surgery-only" else HF_WEIGHTS
    files = []
    for i, (name, group) in enumerate(((main, stored(v.tensors, dtypes)),
                                       (OWN_WEIGHTS, v.extras))):
        if i and not group:  # no surgery-only extras (main may itself be surgery.safetensors)
            continue
        limit = max_shard_bytes or DEFAULT_SHARD
        if sum(t.numel() * t.element_size() for t in group.values()) <= limit:
            # one metadata key: safetensors orders keys randomly
            save_file({k: group[k] for k in sorted(group)}, str(directory / name),
                      metadata={"format": "pt"})
            files.append(name)
        else:
            w = ShardWriter(directory, name.removesuffix(".safetensors"), limit)
            for k in sorted(group):
                w.add(k, group[k])
            files += w.finish()
    if v.layout == "compressed-tensors":
        write_quantization(directory, model, v.converted)
    record: dict[str, Any] = {"layout": v.layout, "files": files,
                              "converted": dict(sorted(v.converted.items()))}
    if v.refusals:
        record["no_standard_form"] = dict(sorted(v.refusals.items()))
    return record


def refusing_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json that transformers' Auto classes refuse, naming surgery.load."""
    out = dict(config)
    out[ORIGINAL] = {"model_type": config.get("model_type"),
                     "architectures": config.get("architectures")}
    out["model_type"] = REFUSED_MODEL_TYPE
    out["architectures"] = ["SurgeryOnlyModel"]
    return out


def base_config(config: dict[str, Any]) -> dict[str, Any]:
    """The base model's config from a saved config.json (undoes the refusal and the
    compressed-tensors ``quantization_config``: surgery rebuilds its own layers)."""
    out = dict(config)
    original = out.pop(ORIGINAL, None)
    if original is not None:
        out["model_type"] = original["model_type"]
        out["architectures"] = original["architectures"]
    out.pop("quantization_config", None)
    return out


def read(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our exact state dict (aliases not yet expanded) from a saved directory."""
    from safetensors.torch import load_file  # noqa: F401 - kept for old single-file outputs

    from surgery.executor.writer import exists, read_sharded

    record = manifest.get("weights")
    if record is None:  # written before layouts existed: everything in model.safetensors
        return load_file(str(directory / HF_WEIGHTS))
    if record["layout"] == "surgery-only":
        return read_sharded(directory, "surgery")
    if record["layout"] == "compressed-tensors" and not ct.available():
        from surgery.diagnostics import error

        raise error("E0600", f"`{directory}` stores quantized layers in the compressed-tensors "
                             "format, and the `compressed-tensors` package is not installed",
                    help="pip install compressed-tensors (or surgery[deploy])")
    state = read_sharded(directory, "model")
    extras = read_sharded(directory, "surgery") if exists(directory, "surgery") else {}
    modules = manifest.get("modules", {})
    for path, kind in record.get("converted", {}).items():
        prefix = path + "."
        local = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        own = {k[len(prefix):]: v for k, v in extras.items() if k.startswith(prefix)}
        ours = CONVERTERS[kind].from_hf(modules[path]["config"], local, own)
        state.update({prefix + k: v for k, v in ours.items()})
    return state


def _is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict")
