"""A safetensors checkpoint read lazily: the headers are parsed up front (names, shapes, dtypes,
byte ranges); a tensor is read only when asked for, memory-mapped, in its stored dtype.

A shard shorter than its header promises is reported when a read needs the missing bytes (the
file may have been cut after the run started): E0603 naming the shard, never a traceback.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.diagnostics import error

# safetensors dtype names -> torch dtypes (the ones checkpoints hold)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str], int]:
    """(entries, metadata, bytes the file must have) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            head = f.read(n)
            if len(head) < n:
                raise ValueError("the header itself is cut off")
            meta = json.loads(head)
    except (OSError, ValueError) as e:
        raise error("E0603", f"`{path}` is not a readable safetensors file: {e}",
                    help="the checkpoint is corrupt or truncated; re-download or re-save it")
    base = 8 + n
    entries, need = {}, base
    metadata = meta.pop("__metadata__", None) or {}
    for name, info in meta.items():
        b, e = info["data_offsets"]
        entries[name] = Entry(path, info["dtype"], tuple(info["shape"]), base + b, base + e)
        need = max(need, base + e)
    return entries, metadata, need


class Checkpoint:
    """A safetensors checkpoint (one file, or a directory of shards): names, shapes, lazy reads."""

    def __init__(self, path: str | Path):
        p = Path(str(path).removeprefix("hf:")).expanduser()
        files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
        if not files:
            raise error("E0602", f"`{path}` holds no *.safetensors files",
                        help="streamed execution reads safetensors checkpoints")
        self.dir = p if p.is_dir() else p.parent
        self.files = files
        self.entries: dict[str, Entry] = {}
        self.need: dict[Path, int] = {}
        for f in files:
            entries, _, need = read_header(f)
            self.entries.update(entries)
            self.need[f] = need

    # -- the interface the streamed merge has always used --------------------------------------
    @property
    def where(self) -> dict[str, Path]:
        return {k: e.file for k, e in self.entries.items()}

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k: e.shape for k, e in self.entries.items()}

    @property
    def dtypes(self) -> dict[str, str]:
        return {k: e.dtype for k, e in self.entries.items()}

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def torch_dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name].dtype]

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def float_dtype(self) -> torch.dtype:
        """The dtype most floating-point bytes are stored in (the checkpoint's dtype)."""
        count: dict[str, int] = {}
        for e in self.entries.values():
            if DTYPES.get(e.dtype, torch.int8).is_floating_point:
                count[e.dtype] = count.get(e.dtype, 0) + e.nbytes
        return DTYPES[max(count, key=count.get)] if count else torch.float32

    def read(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype. The mapping is dropped afterwards, so pages of tensors
        already processed do not stay resident."""
        return self._read(name, lambda h: h.get_tensor(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (its first dimension), read without the rest."""
        return self._read(name, lambda h: h.get_slice(name)[start:stop])

    def _read(self, name: str, get) -> torch.Tensor:
        from safetensors import safe_open

        e = self.entries[name]
        try:
            size = e.file.stat().st_size
        except OSError as exc:
            raise error("E0602", f"shard `{e.file}` disappeared during the run: {exc.strerror}")
        if size < e.end:
            raise error("E0603", f"shard `{e.file.name}` is truncated: it has {size} bytes but "
                                 f"`{name}` ends at byte {e.end} (the header promises "
                                 f"{self.need[e.file]})",
                        help="the checkpoint is incomplete (an interrupted download or copy?); "
                             "no output was written")
        try:
            with safe_open(str(e.file), framework="pt") as h:
                return get(h)
        except Exception as exc:  # noqa: BLE001 - any corruption is the input's problem
            raise error("E0603", f"cannot read `{name}` from `{e.file.name}`: {str(exc)[:200]}",
                        help="the checkpoint is corrupt")


def stored_dtypes(files: list[Path]) -> dict[str, torch.dtype]:
    """name -> stored dtype for the safetensors files among ``files`` (headers only)."""
    out = {}
    for f in files:
        if Path(f).suffix == ".safetensors":
            entries, _, _ = read_header(Path(f))
            out.update({k: DTYPES[e.dtype] for k, e in entries.items() if e.dtype in DTYPES})
    return out
