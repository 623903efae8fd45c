"""The files besides the weights that make a model directory usable: the tokenizer in all its
formats and the chat template (transformers >= 4.43 writes it to chat_template.jinja)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
