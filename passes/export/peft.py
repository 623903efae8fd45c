"""`export peft "DIR"`: write the model's adapters as a PEFT adapter directory.

LoRA layers become a `LORA` adapter (per-layer ranks and scalings as rank_pattern/alpha_pattern,
as EVA needs); Bone layers become PEFT's `MISS` adapter (Bone's successor; Bone was removed from
PEFT in 0.19). `peft.PeftModel.from_pretrained(base, DIR)` on the original base model reproduces
our outputs. The directory is written atomically.

``base_model_name_or_path`` is the directory transformers loads the base from, so that
``AutoPeftModelForCausalLM.from_pretrained(DIR)`` works alone. Adapters trained on a quantized
base (QLoRA-style) would be wrong on the float base: the quantized base (adapters removed) is
written to ``DIR/base`` in the compressed-tensors layout of `save` (transformers dequantizes it
to our exact weights), and the config names that directory.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field

from surgery.atomic import atomic_dir
from surgery.deploy.tokenizer_files import copy_tokenizer
from surgery.passapi import (Granularity, ModelPass, OutputPath, PassError, PassParams,
                             PassResult, RunContext, State, StepReport)
from surgery.registry import register

PREFIX = "base_model.model."


def _common(values: list[Any]) -> Any:
    """The most frequent value (ties: the first seen), for the config's global fields."""
    return Counter(values).most_common(1)[0][0]


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def _lora_files(layers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    notes = []
    r = _common([m.r for m in layers.values()])
    rslora = _common([m.rslora for m in layers.values()])
    alpha = _common([m.alpha for m in layers.values() if m.r == r] or [m.alpha for m in layers.values()])
    dropouts = [m.dropout_p for m in layers.values()]
    if len(set(dropouts)) > 1:
        notes.append(f"PEFT has one lora_dropout; layers differ, wrote {_common(dropouts)}")
    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for path, m in layers.items():
        if m.r != r:
            rank_pattern[path] = m.r
        # PEFT derives scaling from alpha and rank: pick the alpha that gives our scaling.
        want = m.scaling * (math.sqrt(m.r) if rslora else m.r)
        if not math.isclose(want, alpha, rel_tol=1e-12, abs_tol=0.0):
            alpha_pattern[path] = want
        tensors[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous().clone()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous().clone()
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": _common(dropouts),
        "use_rslora": rslora, "target_modules": sorted(layers), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None,
    }
    return config, tensors, notes


def _miss_files(layers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    kinds = {(m.block, m.variant, m.dropout_p) for m in layers.values()}
    if len(kinds) > 1:
        raise PassError("PEFT's MiSS format has one block size, variant and dropout per adapter; "
                        f"the model mixes {sorted(kinds)}",
                        hint="use the same bone(...) settings for every layer you export")
    block, variant, dropout = kinds.pop()
    tensors = {f"{PREFIX}{path}.miss_block": m.bone_block.detach().cpu().contiguous().clone()
               for path, m in layers.items()}
    config = {
        "peft_type": "MISS", "r": block, "init_weights": "bat" if variant == "bat" else True,
        "miss_dropout": dropout, "mini_r": 1, "target_modules": sorted(layers), "bias": "none",
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
    }
    return config, tensors, []


def _base_source(ctx: RunContext) -> str | None:
    sources = list(ctx.model_sources.values())
    return ctx.extras.get("base_source") or (sources[0] if len(sources) == 1 else None)


def base_source_dir(ctx: RunContext) -> Path | None:
    """The directory transformers loads the run's base model from (None if there is none)."""
    from surgery.models import local_dir

    source = _base_source(ctx)
    return local_dir(source) if source is not None else None


def _base_path(ctx: RunContext) -> str | None:
    """Where PEFT finds the base: the directory transformers loads (so that
    ``AutoPeftModelFor*.from_pretrained(DIR)`` works), else the source as written."""
    d = base_source_dir(ctx)
    return str(d) if d is not None else _base_source(ctx)


BASE_DIR = "base"  # the quantized base, written beside the adapter


def _quantized_layers(model: nn.Module) -> int:
    from surgery.passes.quantize.qlinear import QuantLinear

    return sum(isinstance(m, QuantLinear) for m in model.modules())


@contextlib.contextmanager
def _without_adapters(model: nn.Module, layers: dict[str, nn.Module]):
    """The model with every adapter wrapper replaced by the layer it wraps (restored after)."""
    from surgery.passapi import replace_module

    try:
        for path, m in layers.items():
            replace_module(model, path, m.base_layer)
        yield model
    finally:
        for path, m in layers.items():
            replace_module(model, path, m)


def _write_quantized_base(model: nn.Module, layers: dict[str, nn.Module], directory: Path,
                          tokenizer_source: Path | None) -> tuple[str | None, list[str]]:
    """Write the quantized base (adapters removed) as a compressed-tensors directory, which
    transformers loads with the base's exact dequantized weights; returns its layout's refusal
    reasons instead when it has no such form."""
    from surgery import emit, registry
    from surgery.deploy import hf_dir

    with _without_adapters(model, layers):
        tensors, _ = emit.split_aliases(model)
        modules = registry.surgery_modules(model)
        view = hf_dir.view(model, tensors, modules)
        if view.layout == "surgery-only" or not hasattr(model, "config"):
            return None, sorted(view.refusals.values())[:1]
        directory.mkdir()
        record = hf_dir.write(directory, model, tensors, modules)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(directory))
    if tokenizer_source is not None and tokenizer_source.is_dir():
        copy_tokenizer(tokenizer_source, directory)
    return record["layout"], []


class PeftExportParams(PassParams):
    path: OutputPath = Field(description="output directory")


@register
class PeftExport(ModelPass):
    statement_fields = frozenset({"path"})
    verb = "export"
    method = "peft"
    summary = "write the adapters as a PEFT directory (LoRA -> LORA, Bone -> MISS)"
    Params = PeftExportParams
    is_output = True
    granularity = Granularity.TENSOR  # reads the adapter tensors only
    accepts = frozenset(State)
    requires = frozenset({State.ADAPTED})  # a model without adapters has nothing to export

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        from safetensors.torch import save_file

        from surgery.passes.adapters.layers import AdapterLayer

        layers = {n: m for n, m in ctx.model.named_modules() if isinstance(m, AdapterLayer)}
        if not layers:
            raise PassError("the model has no adapters to export",
                            hint="attach some first: adapt SEL with lora(...) (and do not merge "
                                 "them before `export peft`)")
        kinds = {m.kind for m in layers.values()}
        if len(kinds) > 1:
            raise PassError("a PEFT adapter directory holds one adapter type; the model has both "
                            "LoRA and Bone adapters", hint="export them from separate scripts")
        build = _lora_files if kinds == {"lora"} else _miss_files
        config, tensors, notes = build(layers)
        base = _base_path(ctx)
        config.update({
            "task_type": _task_type(ctx.model), "inference_mode": True, "revision": None,
            "modules_to_save": None, "base_model_name_or_path": base,
        })
        quantized = _quantized_layers(ctx.model)
        try:
            import peft
            config["peft_version"] = peft.__version__
        except ImportError:  # the files do not need PEFT to be written
            pass
        final = Path(self.params.path).resolve()
        with atomic_dir(self.params.path) as tmp:
            if quantized:  # PEFT must apply the adapters to the base they were trained on
                layout, why = _write_quantized_base(ctx.model, layers, tmp / BASE_DIR,
                                                    base_source_dir(ctx))
                if layout is not None:
                    config["base_model_name_or_path"] = str(final / BASE_DIR)
                    notes.append(f"the base has {quantized} quantized layers: written to "
                                 f"{BASE_DIR}/ ({layout}), and base_model_name_or_path names it")
                else:
                    notes.append(f"the adapters sit on a base with {quantized} quantized "
                                 f"layers that has no transformers form ({why[0]}); "
                                 "base_model_name_or_path names the float base, so PEFT's "
                                 "outputs will differ from ours")
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            if base is not None and Path(base).is_dir():  # the base's tokenizer and template
                copy_tokenizer(Path(base), tmp)
        n = sum(t.numel() for t in tensors.values())
        return self.result(ctx, StepReport(
            modules=len(layers), parameters=n,
            metrics={"peft_type": config["peft_type"], "tensors": len(tensors),
                     "path": str(self.params.path)}, notes=notes))
