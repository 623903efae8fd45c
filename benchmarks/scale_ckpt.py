"""Random-initialised LLaMA-architecture checkpoints for the scale benchmarks (issue 19).

Written tensor by tensor into bf16 safetensors shards of at most ``SHARD_BYTES``: at most one
shard is ever held in memory, so the 16 GB Llama-3-8B-shaped checkpoint is written with ~1 GB of
RAM. Cached under ``$SURGERY_CACHE/scale/NAME`` and made once (a finished directory carries
``surgery-scale.json``; a half-written one is rebuilt). The SmolLM2 tokenizer files are copied in
so that `corpus(...)` data works (its ids are < 49152, inside every vocabulary below).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SHARD_BYTES = 1 << 30  # 1 GiB: the most this writer holds at once


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def params(self) -> int:
        h, hd = self.hidden, self.hidden // self.heads
        attn = 2 * h * h + 2 * h * self.kv_heads * hd
        block = attn + 3 * h * self.intermediate + 2 * h
        return self.layers * block + self.vocab * h * (1 if self.tied else 2) + h


# Sizes: 0.25B (small), Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B dimensions.
SIZES = {
    "llama-0.25b": Dims(1024, 12, 2816, 16, 8, 49152, False),
    "llama-1b": Dims(2048, 16, 8192, 32, 8, 128256, True),
    "llama-3b": Dims(3072, 28, 8192, 24, 8, 128256, True),
    "llama-8b": Dims(4096, 32, 14336, 32, 8, 128256, False),
    # a tiny one for tests and smoke runs of the benchmark itself
    "llama-tiny": Dims(64, 4, 128, 4, 2, 49152, False),
}


def config(d: Dims) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
        "hidden_size": d.hidden, "num_hidden_layers": d.layers,
        "intermediate_size": d.intermediate, "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads, "head_dim": d.hidden // d.heads,
        "vocab_size": d.vocab, "tie_word_embeddings": d.tied, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": False,
    }


def tensor_specs(d: Dims):
    """(name, shape) of every tensor, in the order HF writes them (embeddings, blocks, norm, head)."""
    h, hd = d.hidden, d.hidden // d.heads
    yield "model.embed_tokens.weight", (d.vocab, h)
    for i in range(d.layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.self_attn.q_proj.weight", (h, h)
        yield f"{p}.self_attn.k_proj.weight", (d.kv_heads * hd, h)
        yield f"{p}.self_attn.v_proj.weight", (d.kv_heads * hd, h)
        yield f"{p}.self_attn.o_proj.weight", (h, h)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.mlp.gate_proj.weight", (d.intermediate, h)
        yield f"{p}.mlp.up_proj.weight", (d.intermediate, h)
        yield f"{p}.mlp.down_proj.weight", (h, d.intermediate)
    yield "model.norm.weight", (h,)
    if not d.tied:
        yield "lm_head.weight", (d.vocab, h)


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    # 0.02 like HF's initializer; generated in row chunks to bound the fp32 temporary
    out = torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, (1 << 24) // shape[1])
    for r in range(0, shape[0], step):
        out[r:r + step] = (torch.randn(min(step, shape[0] - r), shape[1], generator=g)
                           * 0.02).to(torch.bfloat16)
    return out


def tokenizer_dir() -> Path:
    from surgery.models import zoo_dir

    return zoo_dir("smollm2-135m")


def cache_root() -> Path:
    from surgery.paths import cache_root as surgery_cache

    return surgery_cache() / "scale"


def write_checkpoint(name: str, root: Path | None = None, *, seed: int = 0, log=print) -> Path:
    """The cached checkpoint directory for ``name``, written first when missing."""
    d = SIZES[name]
    out = (root or cache_root()) / name
    marker = out / "surgery-scale.json"
    if marker.exists():
        return out
    if out.exists():
        shutil.rmtree(out)  # a run killed halfway: start over
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    specs = list(tensor_specs(d))
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for nm, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((nm, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {nm: make_tensor(nm, shape, seed * 100003 + i)
                   for i, (nm, shape) in enumerate(specs) if (nm, shape) in shard}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({nm: fname for nm in tensors})
        del tensors
        log(f"  {name}: wrote {fname}")
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config(d), indent=1))
    tok = tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, tmp / f)
    (tmp / "surgery-scale.json").write_text(json.dumps(
        {"name": name, "dims": asdict(d), "parameters": d.params(), "seed": seed}))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    for n in sys.argv[1:] or ["llama-0.25b"]:
        print(write_checkpoint(n))
