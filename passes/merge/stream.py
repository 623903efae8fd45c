"""Streamed merging over safetensors checkpoints: tensors are read lazily (memory-mapped, one
tensor of each input at a time), merged with the same `TensorMerger` the in-memory pass uses, and
written to output shards as they fill. Peak memory is a small multiple of the largest tensor plus
one output shard, not of the model. The output directory appears atomically.

    from surgery.passes.merge.stream import stream_merge
    stream_merge("ties", ["ckpt/a", "ckpt/b"], "out/merged", base="ckpt/base", density=0.2)
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from pydantic import ValidationError

from surgery.atomic import atomic_dir
from surgery.diagnostics import SurgeryError
from surgery.executor.checkpoint import Checkpoint as LazyCheckpoint
from surgery.executor.writer import ShardWriter
from surgery.deploy.tokenizer_files import TOKENIZER_FILES
from surgery.passapi import PassError
from surgery.progress import Progress
from surgery.registry import get_pass

from .common import TensorMerger, tensor_kinds
from .taskvec import compatibility_problems, is_mergeable

# Everything but weights that a model directory needs: config, tokenizer and chat template.
_COPY = ("config.json", "generation_config.json", *TOKENIZER_FILES)


class Checkpoint(LazyCheckpoint):
    """The executor's lazy checkpoint (surgery/executor/checkpoint.py), with the streamed
    merge's historical error type for a path that holds no weights."""

    def __init__(self, path: str | Path):
        try:
            super().__init__(path)
        except SurgeryError as e:
            if e.diagnostics[0].code.value != "E0602":
                raise
            raise PassError(f"`{path}` holds no *.safetensors files",
                            hint="streamed merges read safetensors checkpoints") from None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so resident memory
    tracks the tensors alive now rather than the high-water mark of earlier ones."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _kinds(ck: Checkpoint) -> dict[str, str]:
    cfg = ck.dir / "config.json"
    if cfg.exists():
        try:
            from surgery.models import build_skeleton

            return tensor_kinds(build_skeleton(json.loads(cfg.read_text())))
        except Exception:  # not a transformers config: fall back to names and shapes
            pass
    out = {}
    for k, s in ck.shapes.items():
        if len(s) == 2 and k.endswith("weight"):
            out[k] = "embedding" if "embed" in k else "matrix"
    return out


def stream_merge(method: str | TensorMerger, models: Sequence[str | Path], out: str | Path, *,
                 base: str | Path | None = None, shard_bytes: int = 1 << 30, seed: int = 0,
                 exclude: Sequence[str] = (), progress=None, **params) -> dict:
    """Merge checkpoints tensor by tensor into `out` (sharded safetensors + index + config)."""
    if isinstance(method, str):
        P = get_pass("merge", method)
        if P is None or not hasattr(P, "merger_cls") or P.merger_cls is TensorMerger:
            raise PassError(f"`{method}` is not a parameter-space merge and cannot be streamed",
                            hint="stream linear or a task-vector method (task_arithmetic, ties, "
                                 "dare, dare_ties, dare_linear, pcb, widen)")
        names = [f"m{i}" for i in range(len(models))]
        try:
            prm = P.Params(models=names, base="base" if base else None, exclude=list(exclude),
                           **params)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = err["msg"].removeprefix("Value error, ")
            raise PassError(f"{method}: {where + ': ' if where else ''}{msg}",
                            hint="pass base=... for task-vector methods") from None
        merger = P.merger_cls(prm, seed=seed)
    else:
        merger = method
    if merger.scope != "per_tensor":
        raise PassError("scope=global needs every task vector in memory at once",
                        hint="use scope=per_tensor for streamed merges")
    if merger.needs_base and base is None:
        raise PassError("this method needs a base checkpoint", hint="pass base=...")
    cks = [Checkpoint(m) for m in models]
    bck = Checkpoint(base) if base is not None else None
    ref = bck or cks[0]
    named = {("base" if bck else "m0"): ref.shapes}
    named.update({f"m{i}": c.shapes for i, c in enumerate(cks) if c is not ref})
    probs = compatibility_problems(named)
    if probs:
        raise PassError(probs[0], hint="only checkpoints of the same architecture merge")
    kinds = _kinds(ref)
    merged = 0
    with atomic_dir(out) as tmp:
        # The executor's shard writer: tensors go to disk as they are merged (bounded memory).
        writer = ShardWriter(tmp, "model", shard_bytes)
        names = ref.names()
        with (progress or Progress()).task("streamed merge", total=len(names)) as task, \
                torch.no_grad():
            for name in names:
                b = ref.read(name)
                if is_mergeable(name, b, exclude):
                    ts = [c.read(name) for c in cks]
                    t = merger.merge(name, b if bck else None, ts, kinds.get(name, "other"))
                    del ts
                    merged += t.numel()
                else:
                    t = b
                writer.add(name, t)
                del b, t
                _release_freed_memory()
                task.advance()
        files = writer.finish()
        n = len([f for f in files if f.endswith(".safetensors")])
        for extra in _COPY:
            if (ref.dir / extra).exists():
                shutil.copy2(ref.dir / extra, tmp / extra)
    return {"tensors": len(writer.weight_map), "merged_parameters": merged, "shards": n}
