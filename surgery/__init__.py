"""surgery: a declarative model-surgery language and compiler for PyTorch.

The public names are loaded on first use (PEP 562), so ``import surgery`` and the CLI's front
end (parse, check, diagnostics) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Program": "surgery.api",
    "apply": "surgery.api",
    "compile": "surgery.api",
    "Script": "surgery.builder",
    "SurgeryError": "surgery.diagnostics",
    "load": "surgery.emit",
    "Result": "surgery.runner",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from surgery.api import Program, apply, compile  # noqa: F401
    from surgery.builder import Script  # noqa: F401
    from surgery.diagnostics import SurgeryError  # noqa: F401
    from surgery.emit import load  # noqa: F401
    from surgery.runner import Result  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
