"""Resumable training checkpoints: one directory, rewritten atomically every K steps.

A checkpoint holds the step reached, the trained parameters (by name), the AdamW state, the
torch RNG state and the loss log; the learning rate and the data order are pure functions of the
step, so they need no state. Resuming restores all of it bit for bit, so a run killed at any
point and rerun gives the same final weights as one that was never interrupted.

``fingerprint`` ties a checkpoint to one run: the script text, the statement's line, the seed and
the names and shapes of what is trained. A directory holding another run's checkpoint is refused
(E0343) instead of being silently overwritten or resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from surgery import atomic

STATE = "state.pt"
META = "checkpoint.json"


def fingerprint(script: str, line: int, seed: int, names: list[str],
                shapes: list[tuple[int, ...]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"script": script, "line": line, "seed": seed, "params": names,
                         "shapes": [list(s) for s in shapes]}).encode())
    return h.hexdigest()


def read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None


def save(directory: Path, *, fp: str, step: int, params: dict[str, torch.Tensor],
         optimizer: dict[str, Any], log: list[dict[str, Any]]) -> None:
    """Write the checkpoint for ``step`` (replacing the previous one atomically)."""
    with atomic.atomic_dir(directory) as tmp:
        torch.save({"step": step, "params": {k: v.detach().clone() for k, v in params.items()},
                    "optimizer": optimizer, "rng": torch.get_rng_state(), "log": log},
                   tmp / STATE)
        (tmp / META).write_text(json.dumps({"fingerprint": fp, "step": step}, indent=1) + "\n")


def load(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE, map_location="cpu", weights_only=True)


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
