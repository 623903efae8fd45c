"""Model merging: parameter-space methods (linear, task_arithmetic, ties, dare, pcb, widen),
permutation-based methods (weight_matching, pleas) and a streamed engine over safetensors."""

from . import dare, linear, pcb, pleas, task_arithmetic, ties, weight_matching, widen  # noqa: F401
