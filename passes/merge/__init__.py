"""Model merging: the task-vector merges (task_arithmetic, ties, dare, dare_ties, dare_linear, pcb,
widen: rows of one sparsify x consensus x combine pass, taskvector.py), linear averaging,
permutation-based methods (weight_matching, pleas) and a streamed engine over safetensors."""

from . import linear, pleas, taskvector, weight_matching  # noqa: F401
