"""Output passes: `export FORMAT "PATH"` (ONNX models, PEFT adapters) and `save "PATH"`."""

from surgery.passes.export import onnx, peft, save  # noqa: F401  (registers the passes)
