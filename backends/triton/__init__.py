"""Triton kernels for surgery's custom ops.

Importing this package needs ``triton`` (``pip install surgery[triton]``). It registers the
kernels as the CUDA implementations of the ``surgery::`` custom ops (their default, every-device
implementation stays the plain-PyTorch reference): see :mod:`.registry`. On a machine without a
GPU the kernels still run on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before this package is imported; the tests use that.
"""

from surgery.backends.triton.registry import KERNELS, OPS, register_cuda_kernels

register_cuda_kernels()

__all__ = ["KERNELS", "OPS", "register_cuda_kernels"]
