"""Output passes: `export FORMAT "PATH"` (ONNX models, PEFT adapters) and `save "PATH"`."""

from . import onnx, peft, save  # noqa: F401 - importing registers the passes
