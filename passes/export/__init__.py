"""`export FORMAT "PATH"`: ONNX models and PEFT adapters."""

import importlib

for _name in ("onnx", "peft", "save"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":
            raise
