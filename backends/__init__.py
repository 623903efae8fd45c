"""Backends: custom ops with reference implementations, ONNX export, Triton kernels."""

import torch

if torch.cuda.is_available():  # pragma: no cover - GPU machines only
    # Register the Triton kernels as the CUDA implementations of our custom ops, so quantized
    # layers run on them without an explicit `lower` step.
    try:
        import surgery.backends.triton.registry  # noqa: F401
    except ImportError:
        pass
