"""Helpers shared by the Triton launchers: views of a tensor as contiguous rows."""

from __future__ import annotations

import torch

from surgery.backends.ops.registry import KERNEL_DTYPES  # noqa: F401 - the launchers' dtypes


def as_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size, int]:
    """Move ``dim`` last and flatten the rest: (rows, n) contiguous, plus what undoes it."""
    if x.dim() == 0:
        raise ValueError("a reduction over a dimension needs a tensor with at least one dim")
    d = dim % x.dim()
    moved = x.movedim(d, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous(), moved.shape, d


def from_rows(rows: torch.Tensor, shape: torch.Size, d: int) -> torch.Tensor:
    return rows.reshape(shape).movedim(-1, d)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def fp32_dots(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are upcast to fp32 (IEEE): always for fp32 inputs, and for
    bf16 in the interpreter, whose ``dot`` multiplies bf16's raw uint16 storage (Triton 3.9)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
