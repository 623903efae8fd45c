"""Backends: custom ops with reference implementations, ONNX export, Triton kernels."""
