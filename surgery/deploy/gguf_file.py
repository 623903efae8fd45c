"""A transformed LLaMA-family model as one GGUF file for llama.cpp.

What llama.cpp's ``llama`` architecture computes is fixed: RMSNorm, rotary attention with
softmax, SwiGLU MLP, one weight matrix per projection. A model whose modules compute anything
else (a swapped attention normaliser, unmerged adapters, concatenated heads, a sparse-training
schedule) or whose shapes differ from the hyperparameters is refused with the module path, never
written as a file that would load and run a different function.

Weights (gguf_weights.py): quantized layers keep their codes where a GGML block type means the
same thing, the rest is requantised from our float weights; pruned layers are dense matrices
with exact zeros. llama.cpp applies rotary embeddings to adjacent pairs while transformers
rotates halves, so q/k rows are reordered per head (the inverse of the permutation Meta's
checkpoints went through on their way to transformers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.deploy import gguf_vocab
from surgery.deploy.gguf_weights import FLOAT_TYPES, Encoded, Weight, encode
from surgery.passapi import PassError

UNREPRESENTABLE = "E0810"
UNSUPPORTED_ARCH = "E0811"
ARCHITECTURES = {"llama": "llama"}  # transformers model_type -> llama.cpp architecture

# surgery module types llama.cpp can run: their weights are written in a standard form
ALLOWED = {"QuantLinear", "SparseLinear", "TritonLowering"}
WHY = {
    "AttentionSwap": "the attention normaliser is swapped; llama.cpp runs softmax attention",
    "LoraLinear": "an unmerged LoRA adapter; `merge adapters` first (or `export peft`)",
    "BoneLinear": "an unmerged Bone adapter; `merge adapters` first (or `export peft`)",
    "ConcatHeads": "two concatenated classifier heads; llama.cpp has one output head",
}


# K-quant types: the `gguf` package cannot write them, llama.cpp's own quantizer does (from an f16
# file written first); our type name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* name
LLAMA_CPP_TYPES = {"q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K"}


@dataclass
class TensorRecord:
    name: str
    source: str  # our module path
    encoded: Encoded
    reference: torch.Tensor | None = None  # kept only for llama.cpp's quantizer (error report)


@dataclass
class GGUFReport:
    path: str
    bytes: int = 0
    arch: str = "llama"
    tensors: list[TensorRecord] = field(default_factory=list)
    vocab: dict[str, Any] = field(default_factory=dict)

    def count(self, how: str) -> int:
        return sum(t.encoded.how == how for t in self.tensors)

    def max_rel_error(self, how: str | None = None) -> float:
        errs = [t.encoded.rel_error for t in self.tensors if how in (None, t.encoded.how)]
        return max(errs, default=0.0)

    def types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.encoded.ggml_type] = out.get(t.encoded.ggml_type, 0) + 1
        return dict(sorted(out.items()))


def refusals(model: nn.Module) -> dict[str, str]:
    """Module path -> why llama.cpp cannot run it (empty: every module is representable)."""
    from surgery.deploy import sparse
    from surgery.registry import surgery_modules

    out = {}
    for path, info in surgery_modules(model).items():
        kind = info["type"]
        if kind == "SparseLinear":
            why = sparse.refusal(model.get_submodule(path))
        elif kind in ALLOWED:
            why = None
        else:
            why = WHY.get(kind, "a surgery-only module type with no llama.cpp equivalent")
        if why:
            out[path] = f"{kind}: {why}"
    return out


def check_model(model: nn.Module) -> str:
    """The llama.cpp architecture of ``model``; PassError (located at the module) otherwise."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise PassError(f"export gguf writes LLaMA-family decoders; this model is "
                        f"{kind or type(model).__name__}", code=UNSUPPORTED_ARCH,
                        hint=f"supported model types: {', '.join(ARCHITECTURES)}")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise PassError(f"rope scaling `{rope.get('rope_type')}` is not written by export gguf",
                        code=UNSUPPORTED_ARCH, hint="supported: the default rotary embedding")
    bad = refusals(model)
    if bad:
        path, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more modules)" if len(bad) > 1 else ""
        raise PassError(f"llama.cpp cannot represent `{path}`: {why}{more}", module=path,
                        code=UNREPRESENTABLE,
                        hint="a GGUF file must compute what our model computes; `save` keeps "
                             "every module type (surgery.load reads it)")
    return ARCHITECTURES[kind]


def _rope(config) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    out = {**scaling, **params}
    if "rope_theta" not in out:
        out["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    return out


def _weight(mod: nn.Module) -> Weight:
    from surgery.passes.quantize.qlinear import QuantLinear

    if isinstance(mod, QuantLinear):
        return Weight(codes=mod.codes(), scales=mod.scales.detach(), zeros=mod.zeros,
                      bits=mod.bits, permuted=mod.perm is not None,
                      dequantized=mod.dequantized_weight())
    return Weight(float_weight=mod.weight.detach())


def _rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns transformers' half-split rotary layout into llama.cpp's pairs."""
    hd = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def _tensors(model: nn.Module, n_head: int, n_kv: int):
    """(our tensor name, Weight or 1-D float tensor, heads) for every tensor to write; ``heads``
    is the head count whose rotary rows are reordered (q/k projections), else 0."""
    embed = model.get_input_embeddings()
    out = []
    for path, mod in model.named_modules():
        own = {n: t for n, t in list(mod._parameters.items()) + list(mod._buffers.items())
               if n in ("weight", "bias") and t is not None}
        if type(mod).__name__ == "QuantLinear":
            own = {"weight": None, **({"bias": mod.bias} if mod.bias is not None else {})}
        if not own:
            continue
        if own.get("weight") is not None and own["weight"] is embed.weight and mod is not embed:
            continue  # an output head tied to the embedding: llama.cpp reuses token_embd
        heads = n_head if path.endswith("q_proj") else n_kv if path.endswith("k_proj") else 0
        for n, t in own.items():
            if n == "weight" and (t is None or t.dim() == 2):
                out.append((f"{path}.weight", _weight(mod), heads))
            else:
                out.append((f"{path}.{n}", t.detach(), heads))
    return out


def write(model: nn.Module, path: str | Path, *, type: str = "auto", tokenizer=None,
          tokenizer_source: Path | None = None) -> GGUFReport:
    try:
        import gguf
    except ImportError as e:
        raise PassError(f"export gguf needs the `gguf` package ({e})", code="E0803",
                        hint="pip install gguf (or surgery[hf])") from e

    from surgery.atomic import atomic_file

    arch = check_model(model)
    cfg = model.config
    n_layer = len(model.model.layers)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    n_embd = cfg.hidden_size
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    float_type = type if type in FLOAT_TYPES else "f16"
    report = GGUFReport(str(path), arch=arch)
    expected = _expected_shapes(n_embd, n_head, n_kv, head_dim, n_vocab)
    n_ff: dict[int, int] = {}
    records = []
    for ours, value, heads in _tensors(model, n_head, n_kv):
        name = tmap.get_name(ours, try_suffixes=(".weight", ".bias"))
        if name is None:
            module = ours.rsplit(".", 1)[0]
            raise PassError(f"llama.cpp's {arch} architecture has no tensor for `{ours}`",
                            module=module, code=UNREPRESENTABLE,
                            hint="export gguf writes the standard LLaMA modules only")
        if isinstance(value, Weight):
            _check_shape(name, ours, tuple(value.reference().shape), expected, n_ff)
            if heads:
                value = value.rows(_rope_rows(value.reference().shape[0], heads))
            is_block = name.startswith("blk.")
            if type in LLAMA_CPP_TYPES:  # f16 now; llama.cpp quantizes the whole file below
                enc = encode(value, "f16")
                records.append(TensorRecord(name, ours, enc, value.reference()))
                continue
            enc = encode(value, type if is_block or value.quantized else float_type)
        else:
            t = value.to(torch.float32)
            if heads:
                t = t.index_select(0, _rope_rows(t.shape[0], heads))
            enc = encode(Weight(float_weight=t.reshape(1, -1)), "f32")
            enc.data = enc.data.reshape(t.shape)
        records.append(TensorRecord(name, ours, enc))
    ffs = [n_ff[i] for i in sorted(n_ff)]
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(getattr(cfg, "_name_or_path", "") or "surgery model")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(ffs[0] if len(set(ffs)) == 1 else ffs)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(float(_rope(cfg)["rope_theta"]))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(n_vocab)
        w.add_file_type(_file_type(records))
        tok = gguf_vocab.tokenizer_dir(tokenizer, tokenizer_source)
        try:
            report.vocab = gguf_vocab.add_vocab(w, Path(getattr(tok, "name", tok)), n_vocab)
        finally:
            if hasattr(tok, "cleanup"):
                tok.cleanup()
        for r in records:
            qtype = gguf.GGMLQuantizationType[r.encoded.ggml_type]
            raw = None if qtype in (gguf.GGMLQuantizationType.F32,
                                    gguf.GGMLQuantizationType.F16) else qtype
            w.add_tensor(r.name, r.encoded.data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if type in LLAMA_CPP_TYPES:
            records = _llama_quantize(Path(tmp), LLAMA_CPP_TYPES[type], records)
        report.bytes = Path(tmp).stat().st_size
    report.tensors = records
    return report


def _llama_quantize(path: Path, ftype: str, records: list[TensorRecord]) -> list[TensorRecord]:
    """Quantize the f16 file at ``path`` in place with llama.cpp's quantizer (its K-quant mixes:
    Q4_K_M keeps some tensors in Q6_K), then measure every weight's error from the file."""
    import ctypes

    import gguf
    import numpy as np

    try:
        import llama_cpp
    except ImportError as e:
        raise PassError(f"K-quant types are written by llama.cpp's quantizer, and "
                        f"llama-cpp-python is not importable ({e})", code="E0803",
                        hint="pip install llama-cpp-python, or use type=q4_0 / q4_1 / q8_0") from e
    src = path.with_name(path.name + ".f16")
    path.rename(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = torch.get_num_threads()
    try:
        with _c_stderr_silenced():  # the quantizer logs every tensor; passes never print
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(),
                                                ctypes.byref(params))
    finally:
        src.unlink()
    if rc != 0:
        raise PassError(f"llama.cpp's quantizer failed on the f16 file (return code {rc})")
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    out = []
    for r in records:
        t = by_name[r.name]
        if r.reference is None:
            out.append(r)
            continue
        back = torch.from_numpy(np.asarray(gguf.quants.dequantize(np.asarray(t.data),
                                                                  t.tensor_type),
                                           dtype=np.float32)).reshape(r.reference.shape)
        err = back - r.reference
        enc = Encoded(np.empty((0, 0)), t.tensor_type.name,
                      "requantized" if t.tensor_type.name not in ("F16", "F32") else "float",
                      float(err.norm()) / max(float(r.reference.norm()), 1e-30),
                      float(err.abs().max()))
        out.append(TensorRecord(r.name, r.source, enc))
    return out


@contextlib.contextmanager
def _c_stderr_silenced():
    """Point file descriptor 2 at /dev/null (C libraries write to it directly)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _expected_shapes(n_embd, n_head, n_kv, head_dim, n_vocab) -> dict[str, tuple]:
    return {"token_embd": (n_vocab, n_embd), "output": (n_vocab, n_embd),
            "attn_q": (n_head * head_dim, n_embd), "attn_k": (n_kv * head_dim, n_embd),
            "attn_v": (n_kv * head_dim, n_embd), "attn_output": (n_embd, n_head * head_dim)}


def _check_shape(name: str, ours: str, shape: tuple, expected: dict, n_ff: dict) -> None:
    parts = name.split(".")
    key = parts[2] if parts[0] == "blk" else parts[0]
    if key in ("ffn_gate", "ffn_up", "ffn_down"):
        ff = shape[1] if key == "ffn_down" else shape[0]
        layer = int(parts[1])
        if n_ff.setdefault(layer, ff) != ff:
            raise PassError(f"`{ours}` has {ff} hidden units where the layer's other MLP "
                            f"projections have {n_ff[layer]}", module=ours.rsplit(".", 1)[0],
                            code=UNREPRESENTABLE)
        return
    want = expected.get(key)
    if want is not None and tuple(shape) != want:
        raise PassError(f"`{ours}` has shape {tuple(shape)}; llama.cpp derives {want} from the "
                        "config's head counts and sizes", module=ours.rsplit(".", 1)[0],
                        code=UNREPRESENTABLE,
                        hint="export gguf needs the LLaMA shapes the config describes")


def _file_type(records: list[TensorRecord]) -> int:
    """llama.cpp's ``general.file_type``: the most common type among the 2-D block weights."""
    import gguf

    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
             "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}
    counts: dict[str, int] = {}
    for r in records:
        if r.name.startswith("blk.") and r.name.endswith(".weight") and \
                r.encoded.data.ndim == 2:
            counts[r.encoded.ggml_type] = counts.get(r.encoded.ggml_type, 0) + 1
    top = max(counts, key=counts.get) if counts else "F32"
    return int(gguf.LlamaFileType[names[top]])
