"""surgery: a declarative model-surgery language and compiler for PyTorch."""

__version__ = "0.1.0"

from surgery.api import Program, apply, compile  # noqa: E402
from surgery.builder import Script  # noqa: E402
from surgery.diagnostics import SurgeryError  # noqa: E402
from surgery.emit import load  # noqa: E402
from surgery.runner import Result  # noqa: E402

__all__ = ["Program", "Result", "Script", "SurgeryError", "apply", "compile", "load"]
