"""Built-in passes, one package per family. Importing a family registers its passes."""

import importlib

FAMILIES = ["quantize", "prune", "adapters", "merge", "attention", "lower", "export"]

for _family in FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:  # a family not written yet
        if _e.name != f"{__name__}.{_family}":
            raise
