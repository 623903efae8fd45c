"""Sharded safetensors output, written tensor by tensor with bounded memory.

Each tensor's bytes go straight to the open shard file (no shard-sized buffer): the shard starts
with a reserved, space-padded header region (the format allows trailing spaces in the header),
filled in when the shard is closed. A header that outgrows the reservation is handled by
rewriting the shard once. Shards are named like transformers' (``model-00001-of-00003``) with an
``model.safetensors.index.json``; a single shard is plain ``model.safetensors``.

A failed write (disk full, I/O error) raises E0805/E0802; the caller's atomic directory is then
discarded, so no partial artifact is ever published.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from surgery.diagnostics import error
from surgery.executor.checkpoint import NAMES

RESERVE = 256 * 1024  # bytes reserved for each shard's header
DEFAULT_SHARD = 5 * 10**9  # --max-shard-size default (transformers' 5GB)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Writes ``{stem}.safetensors`` (or ``{stem}-0000i-of-0000n.safetensors`` + index) into
    ``directory``, which should be an atomic output directory."""

    def __init__(self, directory: Path, stem: str = "model", max_shard_bytes: int = DEFAULT_SHARD,
                 metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.stem = stem
        self.max = max(1, int(max_shard_bytes))
        self.metadata = metadata or {"format": "pt"}
        self.parts: list[Path] = []
        self.weight_map: dict[str, int] = {}  # name -> part index
        self.total = 0
        self._f = None
        self._entries: dict = {}
        self._size = 0

    # -- writing ----------------------------------------------------------------------------
    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map:
            raise ValueError(f"internal: tensor `{name}` written twice")
        data = tensor_bytes(t)
        if self._f is not None and self._size and self._size + data.nbytes > self.max:
            self._close_part()
        if self._f is None:
            self._open_part()
        start = self._size
        self._write(data)
        self._size += data.nbytes
        self._entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [start, self._size]}
        self.weight_map[name] = len(self.parts) - 1
        self.total += data.nbytes

    def _open_part(self) -> None:
        path = self.dir / f".{self.stem}-part-{len(self.parts):05d}.safetensors"
        self.parts.append(path)
        self._f = self._guard(lambda: open(path, "wb"), path)
        self._guard(lambda: self._f.write(b" " * (8 + RESERVE)), path)
        self._entries, self._size = {}, 0

    def _write(self, data: memoryview) -> None:
        self._guard(lambda: self._raw_write(data), self.parts[-1])

    def _raw_write(self, data: memoryview) -> None:
        """The one place tensor bytes reach the file (tests inject disk-full errors here)."""
        self._f.write(data)

    def _close_part(self) -> None:
        path = self.parts[-1]
        head = json.dumps({"__metadata__": self.metadata, **self._entries},
                          separators=(",", ":")).encode()
        f = self._f
        self._f = None
        if len(head) <= RESERVE:
            head = head + b" " * (RESERVE - len(head))
            self._guard(lambda: (f.seek(0), f.write(struct.pack("<Q", RESERVE) + head),
                                 f.close()), path)
            return
        # Rare: a header larger than the reservation. Rewrite the shard with an exact header.
        self._guard(f.close, path)
        pad = (-len(head)) % 8
        head += b" " * pad
        tmp = path.with_name(path.name + ".re")

        def rewrite():
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                dst.write(struct.pack("<Q", len(head)) + head)
                src.seek(8 + RESERVE)
                shutil.copyfileobj(src, dst, 1 << 24)
            os.replace(tmp, path)
        self._guard(rewrite, path)

    def _guard(self, fn, path: Path):
        try:
            return fn()
        except OSError as e:
            if self._f is not None:
                try:
                    self._f.close()
                except OSError:
                    pass
                self._f = None
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise error("E0805", f"the disk filled up while writing `{path.name}` "
                                     f"({self.total / 1e9:.2f} GB written so far)",
                            help="free space or choose another output directory; nothing was "
                                 "published and the input is untouched") from None
            raise error("E0802", f"cannot write `{path.name}`: {e.strerror or e}",
                        help="nothing was published and the input is untouched") from None

    # -- finishing ----------------------------------------------------------------------------
    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index. Returns
        the file names (the index last, when there is one)."""
        if self._f is not None:
            self._close_part()
        if not self.parts:  # an empty state still gets a (valid, empty) file
            self._open_part()
            self._close_part()
        n = len(self.parts)
        names = [f"{self.stem}.safetensors"] if n == 1 else \
            [f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for part, name in zip(self.parts, names):
            self._guard(lambda: part.rename(self.dir / name), part)
        out = list(names)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            path = self.dir / f"{self.stem}.safetensors.index.json"
            self._guard(lambda: path.write_text(json.dumps(index, indent=2)), path)
            out.append(path.name)
        return out

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


def read_sharded(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``{stem}.safetensors`` or of its shards (via the index)."""
    from safetensors.torch import load_file

    single = directory / f"{stem}.safetensors"
    if single.exists():
        return load_file(str(single))
    index = directory / f"{stem}.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


def exists(directory: Path, stem: str) -> bool:
    return (directory / f"{stem}.safetensors").exists() or \
        (directory / f"{stem}.safetensors.index.json").exists()
