"""ONNX graphs for serving: decoders with a KV cache, encoders with an attention mask.

Decoder (``export_decoder_with_cache``), the interface optimum's ORTModelForCausalLM and
onnxruntime-genai use::

    input_ids (batch, sequence) int64, attention_mask (batch, total_sequence) int64,
    position_ids (batch, sequence) int64,
    past_key_values.N.key / .value (batch, kv_heads, past_sequence, head_dim) float32
    -> logits (batch, sequence, vocab),
       present.N.key / .value (batch, kv_heads, past_sequence + sequence, head_dim)

``past_sequence`` may be 0 (the prompt step). The cache is rebuilt inside the traced forward from
the past tensors (transformers' DynamicCache, whose update is a concatenation), so the graph has
no Python state. Encoder (``export_encoder``): ``input_ids, attention_mask[, token_type_ids] ->
last_hidden_state``, so padded batches give the unpadded results.

Both are verified in ONNX Runtime under its default session options (plus the QDQ accuracy entry
of export.py) before the file is renamed into place, on an example with a left-padded row, so
the mask path is the one checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from surgery.atomic import atomic_file
from surgery.backends.onnx.export import (ExportReport, _fold_int4_casts, _op_counts, _quiet,
                                          export_modules, ort_session)
from surgery.backends.onnx.translations import TRANSLATIONS, ExportOptions
from surgery.passapi import PassError

NO_CACHE = "E0813"


@dataclass
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> "CacheShape":
        cfg = model.config
        heads = cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)

    def names(self) -> tuple[list[str], list[str]]:
        past = [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        present = [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        return past, present


class _DecoderWithCache(nn.Module):
    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module, token_types: bool):
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(self, input_ids, attention_mask, *rest):
        kw = {"token_type_ids": rest[0]} if self.token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def check_decoder(model: nn.Module) -> CacheShape:
    from surgery.modelcall import ModelKind

    if ModelKind.of(model) is not ModelKind.CAUSAL_LM:
        raise PassError(f"kv_cache=true needs a causal LM (a decoder); this model is "
                        f"{type(model).__name__}", code=NO_CACHE,
                        hint="leave kv_cache out for encoders: they get an attention_mask input")
    import inspect

    if "cache" not in inspect.signature(model.forward).parameters:
        raise PassError(f"{type(model).__name__}.forward takes no `cache` argument",
                        code=NO_CACHE, hint="export onnx without kv_cache")
    return CacheShape.of(model)


def _padded_mask(batch: int, total: int, pad: int) -> torch.Tensor:
    """All ones except the first ``pad`` positions of the last row (left padding)."""
    mask = torch.ones(batch, total, dtype=torch.int64)
    mask[-1, :pad] = 0
    return mask


def decoder_example(model: nn.Module, shape: CacheShape, seqlen: int, past: int, seed: int = 0):
    """A traced/verified example: batch 2, ``past`` cached tokens, the last row left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, seqlen), generator=g)
    mask = _padded_mask(2, past + seqlen, pad=min(2, past + seqlen - 1))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [torch.randn(2, shape.kv_heads, past, shape.head_dim, generator=g) * 0.5
          for _ in range(2 * shape.layers)]
    return ids, mask, pos, kv


@torch.no_grad()
def export_decoder_with_cache(model: nn.Module, path: str | Path, *, int4: str = "matmulnbits",
                              accuracy_level: int = 0, opset: int = 21, tolerance: float = 1e-3,
                              seqlen: int = 8, past: int = 5, seed: int = 0) -> ExportReport:
    shape = check_decoder(model)
    past_names, present_names = shape.names()
    ids, mask, pos, kv = decoder_example(model, shape, seqlen, past, seed)
    wrapper = _DecoderWithCache(model, shape.layers)
    b = torch.export.Dim("batch", min=1, max=1024)
    s = torch.export.Dim("sequence", min=1, max=8192)
    t = torch.export.Dim("total_sequence", min=1, max=16384)
    p = torch.export.Dim("past_sequence", min=0, max=8192)
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in kv))
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    outputs = ["logits", *present_names]
    prog, report = _export(model, wrapper, (ids, mask, pos, *kv), dynamic, names, outputs, path,
                           ExportOptions(int4=int4, accuracy_level=accuracy_level, opset=opset))
    # verify on the traced example and on a prompt step with an empty cache
    empty = [x[:, :, :0] for x in kv]
    prompt = (ids, _padded_mask(2, seqlen, 2), (_padded_mask(2, seqlen, 2).cumsum(-1) - 1)
              .clamp(min=0))
    _verify(prog, wrapper, path, names, [(ids, mask, pos, *kv), (*prompt, *empty)], report,
            accuracy_level, tolerance)
    return report


@torch.no_grad()
def export_encoder(model: nn.Module, path: str | Path, *, int4: str = "matmulnbits",
                   accuracy_level: int = 0, opset: int = 21, tolerance: float = 1e-3,
                   seqlen: int = 16, seed: int = 0) -> ExportReport:
    import inspect

    token_types = "token_type_ids" in inspect.signature(model.forward).parameters and \
        getattr(model.config, "type_vocab_size", 0) > 0
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, seqlen), generator=g)
    # right padding, as encoder tokenizers pad
    mask = torch.ones(2, seqlen, dtype=torch.int64)
    mask[-1, seqlen - 3:] = 0
    args = (ids, mask) + ((torch.zeros_like(ids),) if token_types else ())
    b = torch.export.Dim("batch", min=1, max=1024)
    s = torch.export.Dim("sequence", min=2, max=8192)
    dynamic = ({0: b, 1: s}, {0: b, 1: s}, tuple({0: b, 1: s} for _ in args[2:]))
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    wrapper = _Encoder(model, token_types)
    prog, report = _export(model, wrapper, args, dynamic, names, ["last_hidden_state"], path,
                           ExportOptions(int4=int4, accuracy_level=accuracy_level, opset=opset))
    _verify(prog, wrapper, path, names, [args], report, accuracy_level, tolerance)
    return report


def _export(model, wrapper, args, dynamic, names, outputs, path, options):
    """The traced ONNX program and its (not yet verified) report."""
    was_training = model.training
    model.eval()
    try:
        with export_modules(model, options), _quiet():
            prog = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dynamic,
                                     opset_version=options.opset, input_names=names,
                                     output_names=outputs, optimize=True, verbose=False,
                                     custom_translation_table=dict(TRANSLATIONS))
    except PassError:
        raise
    except Exception as e:  # noqa: BLE001 - tracing failures become one clear diagnostic
        raise PassError(f"ONNX export failed while tracing {type(model).__name__}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                        hint="export a smaller submodule, or report the unsupported op") from e
    finally:
        model.train(was_training)
    _fold_int4_casts(prog.model)
    report = ExportReport(path=str(path), bytes=0, opset=options.opset,
                          op_counts=_op_counts(prog.model), dynamic=True)
    return prog, report


def _verify(prog, wrapper, path, names, examples, report, accuracy_level, tolerance) -> None:
    """Save to a temporary path, compare every output with PyTorch on every example, rename."""
    with atomic_file(path) as tmp:
        prog.save(str(tmp))
        report.bytes = tmp.stat().st_size
        try:
            sess = ort_session(tmp, accuracy_level)
        except Exception as e:  # noqa: BLE001
            raise PassError(f"ONNX Runtime cannot load the exported model: "
                            f"{str(e).splitlines()[0][:300]}") from e
        worst_abs, worst_rel = 0.0, 0.0
        for args in examples:
            with torch.no_grad():
                ref = wrapper(*args)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
            keep = args[1].numpy().astype(bool)  # padded positions compute nothing meaningful
            for r, o in zip(ref, got):
                r = r.float().numpy()
                if o.shape != r.shape:
                    raise PassError(f"ONNX Runtime returned shape {o.shape}, PyTorch {r.shape}")
                r, o = _real_positions(r, keep), _real_positions(o, keep)
                d = float(np.abs(o.astype(np.float64) - r).max()) if r.size else 0.0
                worst_abs = max(worst_abs, d)
                worst_rel = max(worst_rel, d / max(float(np.abs(r).max()) if r.size else 0, 1e-12))
        report.max_abs_diff, report.max_rel_diff = worst_abs, worst_rel
        report.verified = worst_rel <= tolerance
        if not report.verified:
            raise PassError(f"ONNX Runtime output differs from PyTorch: max relative difference "
                            f"{worst_rel:.2e} > {tolerance:g}",
                            hint="accuracy_level=4 quantizes activations; raise tolerance")


def _real_positions(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The entries of ``x`` at unpadded positions: ``(batch, seq, ...)`` outputs are aligned
    with the mask's last ``seq`` columns, cache tensors ``(batch, heads, total, dim)`` with all."""
    if x.ndim == 4:  # present.N.key/value
        return x.transpose(0, 2, 1, 3)[mask]
    return x[mask[:, mask.shape[1] - x.shape[1]:]]


def genai_config(model: nn.Module, filename: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for the KV-cache graph ``filename``: the model's
    dimensions, our input/output names, and greedy search as the default (what we verify)."""
    cfg = model.config
    shape = CacheShape.of(model)
    gen = getattr(model, "generation_config", None)

    def token(name: str, default: int = 0):
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else (getattr(cfg, name, None) or default)

    context = getattr(cfg, "max_position_embeddings", None) or 2048
    return {
        "model": {
            "bos_token_id": token("bos_token_id"), "eos_token_id": token("eos_token_id"),
            "pad_token_id": token("pad_token_id", token("eos_token_id")),
            "context_length": context, "type": cfg.model_type, "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": shape.head_dim,
                "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": shape.layers, "num_key_value_heads": shape.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0},
    }


def write_sidecars(model: nn.Module, directory: Path, tokenizer=None,
                   tokenizer_source: Path | None = None, graph: str = "model.onnx") -> list[str]:
    """config.json, generation_config.json, genai_config.json and the tokenizer files beside the
    graph, so the directory is what optimum's ORTModelForCausalLM.from_pretrained(directory)
    and onnxruntime-genai's og.Model(directory) read."""
    from surgery.deploy.tokenizer_files import copy_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["use_cache"] = True
    for k in ("quantization_config",):  # the graph holds its own quantized layers
        config.pop(k, None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True,
                                                      default=str))
    written = ["config.json", "genai_config.json"]
    (directory / "genai_config.json").write_text(json.dumps(genai_config(model, graph), indent=2))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(directory))
        written.append("generation_config.json")
    if tokenizer is not None:
        written += [Path(f).name for f in tokenizer.save_pretrained(str(directory))]
    elif tokenizer_source is not None:
        written += copy_tokenizer(tokenizer_source, directory)
    return sorted(set(written))


def decode_inputs(shape: CacheShape, batch: int, past_len: int) -> dict[str, Any]:
    """Empty or zero cache tensors with the graph's names (for callers driving generation)."""
    names, _ = shape.names()
    z = np.zeros((batch, shape.kv_heads, past_len, shape.head_dim), np.float32)
    return {n: z for n in names}


def ort_greedy(sess, shape: CacheShape, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with a KV-cache graph in ONNX Runtime: the prompt in one step, then one
    token per step, feeding ``present`` back as ``past``."""
    past_names, _ = shape.names()
    feed = decode_inputs(shape, 1, 0)
    ids = np.asarray([prompt], dtype=np.int64)
    total = ids.shape[1]
    pos = np.arange(total, dtype=np.int64)[None]
    out: list[int] = []
    for _ in range(new_tokens):
        res = sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                              "position_ids": pos, **feed})
        nxt = int(res[0][0, -1].argmax())
        out.append(nxt)
        feed = dict(zip(past_names, res[1:]))
        ids = np.asarray([[nxt]], dtype=np.int64)
        pos = np.asarray([[total]], dtype=np.int64)
        total += 1
    return out
