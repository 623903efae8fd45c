"""Calibration activations on disk: each batch's hidden state in a file of its own, read back
only while that batch is used (docs/scale.md "Spilling calibration activations").

The layer-sequential engine (engine.py) keeps one block input per calibration batch. In memory
that is samples x seqlen x hidden floats, twice while the next block's inputs are computed: 4 GB
and more on an 8B model. With spilling, the engine writes each hidden state as it is produced
and reads it back for one forward, so about two batches' hidden states are resident. The other
arguments of a block (attention masks, position embeddings) are small and stay in memory.

The raw bytes are written and read back unchanged, so the values are bit-identical. The files
live in a directory of their own (``surgery-spill-*`` under the chosen root), removed when the
engine ends, on success, error or Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from surgery.passapi import PassError

# The directory under which the engine spills (a fresh ``surgery-spill-*`` directory inside
# it per engine run); None keeps the activations in memory. Set by the streamed executor when
# the budget needs it (executor/options.py) or by `--spill-activations DIR`.
SPILL_ROOT: contextvars.ContextVar[str | None] = contextvars.ContextVar("calibration_spill",
                                                                         default=None)


@contextlib.contextmanager
def spilling(root: str | os.PathLike | None) -> Iterator[None]:
    """Engines started inside spill under ``root`` (None: in memory)."""
    token = SPILL_ROOT.set(None if root is None else str(root))
    try:
        yield
    finally:
        SPILL_ROOT.reset(token)


class SpillStore:
    """One engine run's spill directory (created on the first write, removed by ``close``)."""

    def __init__(self, root: str):
        self.root = root
        self.dir: Path | None = None
        self._n = 0
        self.bytes_written = 0

    def inputs(self) -> "SpilledInputs":
        return SpilledInputs(self)

    def write(self, t: torch.Tensor) -> Path:
        """``t``'s raw bytes in a new file; a full disk is a PassError (E0912)."""
        try:
            if self.dir is None:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                self.dir = Path(tempfile.mkdtemp(prefix="surgery-spill-", dir=self.root))
            path = self.dir / f"{self._n}.bin"
            self._n += 1
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            with open(path, "wb") as f:
                _raw_write(f, memoryview(data))
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            what = "the disk filled up" if full else f"cannot write ({e.strerror or e})"
            raise PassError(
                f"{what} while spilling calibration activations to `{self.dir or self.root}` "
                f"({self.bytes_written / 2**20:.1f} MiB written so far)", code="E0912",
                hint="free space there, or choose another directory with --spill-activations "
                     "DIR, or raise --max-memory to keep them in memory; nothing was "
                     "published and the input is untouched") from None
        self.bytes_written += data.nbytes
        return path

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _raw_write(f, data) -> None:
    """The one place spilled bytes are written (tests inject a full disk here)."""
    f.write(data)


class SpilledInputs:
    """A list of block inputs whose hidden states are on disk: ``append`` writes one, indexing
    or iterating reads one back (the caller drops it after its forward)."""

    def __init__(self, store: SpillStore):
        self.store = store
        # (the input without its hidden state, file, shape, dtype, device)
        self._items: list[tuple[Any, Path, torch.Size, torch.dtype, torch.device]] = []

    def append(self, inp) -> None:
        h = inp.hidden()
        path = self.store.write(h)
        self._items.append((inp.with_hidden(None), path, h.shape, h.dtype, h.device))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        rest, path, shape, dtype, device = self._items[i]
        n = 1
        for s in shape:
            n *= s
        h = torch.from_file(str(path), shared=False, size=n, dtype=dtype).reshape(shape)
        return rest.with_hidden(h.to(device))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def drop(self) -> None:
        """Delete the files (this generation of inputs is no longer needed)."""
        for _, path, *_ in self._items:
            with contextlib.suppress(OSError):
                path.unlink()
        self._items = []


def release(inputs) -> None:
    """Free a generation of block inputs: its files when spilled (a list just goes)."""
    if isinstance(inputs, SpilledInputs):
        inputs.drop()
