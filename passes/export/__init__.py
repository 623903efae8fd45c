"""`export FORMAT "PATH"`: ONNX models and PEFT adapters."""

from surgery.passes.export import onnx, peft  # noqa: F401  (registers the passes)
