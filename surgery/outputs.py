"""Output-path checks that run before any work: at `plan`/`check` time and at the start of `apply`.

Each problem is an E0802 (or E0805 for disk space) at the `save` statement, found before a model is
loaded or a pass runs, never after an hour of work:

- the path exists and is a regular file, or a non-empty directory surgery did not write;
- a parent of the path is a regular file (the directory cannot be created);
- the nearest existing parent is not writable (permissions, read-only filesystem);
- the filesystem has less free space than the artifact's estimated size (parameters and buffers at
  their current dtypes; the old artifact is deleted only after the new one is complete, so both
  must fit).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.nn as nn

from surgery import atomic
from surgery.diagnostics import Code, Diagnostic, SurgeryError

# Room kept for the manifest, tokenizer and filesystem overhead beyond the tensors.
SIZE_SLACK_BYTES = 16 << 20


def estimated_bytes(model: nn.Module, dtypes: dict | None = None) -> int:
    """Bytes of the model's distinct parameters and buffers (meta tensors included). ``dtypes``
    (name -> the input's stored dtype): floating tensors are written back in it."""
    seen, total = set(), 0
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        key = (t.device.type, t.data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        want = (dtypes or {}).get(name)
        size = want.itemsize if want is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def output_problem(path: str, model: nn.Module | None = None,
                   dtypes: dict | None = None) -> tuple[str, str, str] | None:
    """(code, message, help) for the first problem with writing an artifact to ``path``."""
    p = Path(path).expanduser()
    absolute = Path(os.path.abspath(p))
    # The nearest existing ancestor, and any ancestor that is not a directory.
    existing = absolute
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing != absolute and not existing.is_dir():
        return (Code.E0802, f"cannot create `{path}`: `{existing}` is a file, not a directory",
                "choose an output path whose parent folders are directories")
    if existing == absolute:
        if not absolute.is_dir():
            return (Code.E0802, f"refusing to replace `{path}`: it exists and is a file",
                    "choose a new output path or remove it first")
        try:
            foreign = any(absolute.iterdir()) and not (absolute / "surgery.json").exists()
        except OSError as e:
            return (Code.E0802, f"cannot read `{path}`: {e.strerror}", "check its permissions")
        if foreign:
            return (Code.E0802, f"refusing to replace `{path}`: it is a non-empty directory that "
                             "surgery did not write", "choose a new output path or remove it first")
    parent = existing if existing != absolute else absolute.parent
    if not _writable(parent):
        return (Code.E0802, f"cannot write to `{parent}` (permission denied or read-only)",
                "choose an output path in a writable directory")
    if model is not None:
        need = estimated_bytes(model, dtypes) + SIZE_SLACK_BYTES
        free = _free_bytes(parent)
        if free < need:
            return (Code.E0805, f"not enough disk space for `{path}`: the artifact needs about "
                             f"{_fmt(need)}, and {_fmt(free)} is free on that filesystem",
                    "free some space or save to another disk")
    return None


def check_output(program, path: str | None, model: nn.Module | None = None, *,
                 claim: bool = False, dtypes: dict | None = None) -> None:
    """Raise a located SurgeryError (at the `save` statement) if ``path`` cannot take the artifact.

    With ``claim`` (the start of `apply`), also lock the output for this process, so a concurrent
    run to the same path fails now (E0804) rather than after its work, and clean up leftovers of
    killed runs (reported through :func:`surgery.atomic.take_notes`). :func:`release` drops it.
    """
    if path is None:
        return
    problem = output_problem(str(path), model, dtypes)
    if problem is None and claim:
        try:
            atomic.claim(path)
        except atomic.OutputLocked as e:
            problem = (Code.E0804, str(e), "wait for the other run to finish, or write elsewhere")
    if problem is None:
        return
    code, message, help_ = problem
    raise SurgeryError(Diagnostic(code, message, getattr(program, "save_span", None),
                                  source=program.source, help=help_))


def release(path: str | None) -> None:
    """Drop the claim :func:`check_output` took on ``path`` (no-op if there is none)."""
    if path is not None:
        atomic.release(path)
