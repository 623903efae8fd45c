"""Output passes: `export FORMAT "PATH"` (ONNX models, GGUF files, PEFT adapters) and `save "PATH"`."""

from surgery.passes.export import gguf, onnx, peft, save  # noqa: F401  (registers the passes)
