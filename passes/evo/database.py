"""The out-of-core database of per-layer compressed variants (EvoPress §3): one file per
(layer, level) in a temporary directory, computed once and read back while the search swaps
levels in and out. Only the layers whose level changes are read for each candidate."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class VariantDB:
    def __init__(self, root: str | Path | None = None):
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="surgery-evopress-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.errors: dict[str, dict[int, float]] = {}  # layer -> level -> relative error

    def _file(self, unit: str, level: int) -> Path:
        digest = hashlib.sha1(unit.encode()).hexdigest()[:10]
        return self.root / f"{digest}-{level}.pt"

    def put(self, unit: str, level: int, payload: dict[str, Any], error: float) -> None:
        torch.save(payload, self._file(unit, level))
        self.errors.setdefault(unit, {})[level] = float(error)

    def get(self, unit: str, level: int) -> dict[str, Any]:
        return torch.load(self._file(unit, level), weights_only=False)

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.root.iterdir())

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)
