"""The out-of-core database of per-layer compressed variants (EvoPress §3): one file per
(layer, level) in a temporary directory, computed once and read back while the search swaps
levels in and out. Only the layers whose level changes are read for each candidate."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class VariantDB:
    def __init__(self, root: str | Path | None = None, key: str = ""):
        """A temporary directory (removed by close), or ``root`` kept for reuse: a later run
        with the same ``key`` (layers, levels, method, calibration tokens) skips the build."""
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="surgery-evopress-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.errors: dict[str, dict[int, float]] = {}  # layer -> level -> relative error

    def reusable(self) -> bool:
        """Whether ``root`` already holds a finished database for this key (then loads it)."""
        index = self.root / "index.json"
        if self._own or not index.exists():
            return False
        saved = json.loads(index.read_text())
        if saved.get("key") != self.key:
            return False
        self.errors = {u: {int(k): v for k, v in e.items()} for u, e in saved["errors"].items()}
        return True

    def finish(self) -> None:
        if not self._own:
            (self.root / "index.json").write_text(json.dumps({"key": self.key,
                                                              "errors": self.errors}))

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
