"""How to feed a model token ids and where its answer is: one rule for every caller.

Metrics, calibration, the attention swap, lowering, EVA and ONNX export all run a model on a
batch of token ids. They share three decisions, made here once:

* the model's kind (:class:`ModelKind`): an HF model (its config has ``vocab_size``) takes
  ``input_ids=``; a plain ``nn.Module`` takes the batch positionally;
* the KV cache: an HF model whose ``forward`` takes ``use_cache`` gets ``use_cache=False``
  (a single forward over whole sequences never reads a cache, so building one is wasted memory);
* the output (:func:`first_output`): the logits of a causal LM, the last hidden state of an
  encoder, the first element of a tuple, or the tensor itself.
"""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Any, Iterable

import torch
import torch.nn as nn

from surgery.passapi import module_device


class ModelKind(str, Enum):
    CAUSAL_LM = "causal-lm"
    ENCODER = "encoder"
    MODULE = "module"

    @classmethod
    def from_config(cls, config: dict | None) -> "ModelKind":
        """The kind of a model described by its HF config dict (None: a plain module)."""
        if config is None:
            return cls.MODULE
        return cls._hf(config.get("architectures") or [])

    @classmethod
    def of(cls, model: nn.Module) -> "ModelKind":
        """The kind of a live model: HF models carry a config with a vocabulary."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "vocab_size"):
            return cls.MODULE
        archs = list(getattr(config, "architectures", None) or []) + [type(model).__name__]
        return cls._hf(archs)

    @classmethod
    def _hf(cls, architectures: Iterable[str]) -> "ModelKind":
        if any(str(a).endswith("ForCausalLM") for a in architectures):
            return cls.CAUSAL_LM
        return cls.ENCODER

    @property
    def takes_ids(self) -> bool:
        """True when the model is called as ``model(input_ids=ids)``."""
        return self is not ModelKind.MODULE


def takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``use_cache`` (decided from its signature)."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward without a Python signature
        return False


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments every single-pass forward on token ids gets (no KV cache)."""
    if ModelKind.of(model).takes_ids and takes_use_cache(model):
        return {"use_cache": False}
    return {}


def forward_ids(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    """Run ``model`` on a batch of token ids (or, for a plain module, its positional input).

    ``ids`` moves to the model's device when it is elsewhere (data lives on the CPU). Extra
    ``kwargs`` go to the model. Returns the model's raw output; see :func:`first_output`.
    """
    device = module_device(model)
    if ids.device != device:
        ids = ids.to(device)
    if ModelKind.of(model).takes_ids:
        return model(input_ids=ids, **model_kwargs(model), **kwargs)
    return model(ids, **kwargs)


def first_output(out: Any) -> torch.Tensor:
    """The tensor a caller wants from a model or block output (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    raise TypeError(f"cannot find the output tensor in a model output of type {type(out).__name__}")

