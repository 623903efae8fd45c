"""ONNX export of transformed models, with translations of our custom ops.

``export_onnx(model, path, int4="matmulnbits"|"qdq", accuracy_level=0, opset=21)`` (export.py);
other families add op translations and export-time module swaps through
``register_translation`` / ``register_export_module`` (translations.py).
"""

from surgery.backends.onnx.export import (ExportReport, example_input, export_onnx,  # noqa: F401
                                          ort_session, run_ort)
from surgery.backends.onnx.translations import (ExportOptions, register_export_module,  # noqa: F401
                                                register_translation)
