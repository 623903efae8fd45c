"""The tokenizer as GGUF metadata, so that llama.cpp tokenizes and detokenizes like transformers.

Only byte-level BPE tokenizers (GPT-2 style: SmolLM2, LLaMA 3, Qwen ...) are written. llama.cpp
picks its pre-tokenizer split rules from ``tokenizer.ggml.pre``; it is derived from the
tokenizer's own ``pre_tokenizer`` (a plain GPT-2 ``ByteLevel`` split is "gpt-2"; ByteLevel after
single-digit splitting is "smollm"), and anything else is refused rather than written with rules
that would tokenize differently.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from surgery.passapi import PassError

TOKENIZER_CODE = "E0812"


def _refuse(why: str) -> PassError:
    return PassError(f"the tokenizer cannot be written to GGUF: {why}", code=TOKENIZER_CODE,
                     hint="llama.cpp needs the model's tokenizer inside the file; export gguf "
                          "supports byte-level BPE tokenizers (tokenizer.json)")


def _pre_type(pre: dict[str, Any] | None) -> str:
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre is None:
        raise _refuse("tokenizer.json has no pre_tokenizer")
    if byte_level(pre):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits"
                and parts[0].get("individual_digits") and byte_level(parts[1])):
            return "smollm"
    raise _refuse(f"its pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent")


def tokenizer_dir(tokenizer, fallback: Path | None) -> tempfile.TemporaryDirectory | Path:
    """A directory holding tokenizer.json (+ config, chat template): the run's tokenizer saved to
    a temporary directory, else the model's source directory."""
    if tokenizer is not None:
        tmp = tempfile.TemporaryDirectory(prefix="surgery-gguf-tok-")
        tokenizer.save_pretrained(tmp.name)
        return tmp
    if fallback is not None and (fallback / "tokenizer.json").exists():
        return fallback
    raise _refuse("the model has no tokenizer (tokenizer.json) beside it")


def add_vocab(writer, directory: Path, n_vocab: int) -> dict[str, Any]:
    """Write the tokenizer keys; returns a summary for the report."""
    import gguf

    path = directory / "tokenizer.json"
    if not path.exists():
        raise _refuse(f"no tokenizer.json in {directory}")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise _refuse(f"it is a {model.get('type')} tokenizer without a byte-level decoder")
    pre = _pre_type(tj.get("pre_tokenizer"))
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL)
                                          for t, i in model["vocab"].items()}
    for added in tj.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= n_vocab:
        raise _refuse(f"it has token id {max(tokens)}, beyond the model's {n_vocab} embeddings")
    texts, types = [], []
    for i in range(n_vocab):  # ids the tokenizer never produces still need an entry
        text, kind = tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        texts.append(text)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        # llama.cpp refuses a BPE vocabulary without merges, and GGUF has no empty array
        raise _refuse("tokenizer.json has no BPE merges (a byte-only vocabulary), which "
                      "llama.cpp cannot load")
    special.add_to_gguf(writer, quiet=True)
    return {"tokens": n_vocab, "pre": pre, "merges": len(special.merges),
            "special": dict(special.special_token_ids),
            "chat_template": special.chat_template is not None}
