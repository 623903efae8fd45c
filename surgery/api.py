"""The Python API: compile a script, check it, plan it against a model, apply it."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from surgery import ast
from surgery.binder import Plan, bind
from surgery.check import CheckedProgram, check
from surgery.models import LoadedModel, load_skeleton
from surgery.parser import parse
from surgery.progress import Progress
from surgery.runner import Result, Runner, load_models, plan_for, subject_for
from surgery.source import SourceFile


class Program:
    """A parsed script. ``check`` / ``plan`` / ``apply`` run the compiler stages."""

    def __init__(self, text: str, name: str = "<script>"):
        self.text = text
        self.name = name
        self.source = SourceFile(text, name)
        self.ast: ast.ScriptNode = parse(text, name)
        self._checked: CheckedProgram | None = None

    def check(self) -> CheckedProgram:
        """Static checks: names, methods, parameters. Raises SurgeryError."""
        if self._checked is None:
            self._checked = check(self.ast, self.source)
        return self._checked

    def plan(self, model: str | nn.Module | LoadedModel | None = None) -> Plan:
        """Bind to a model (default: the script's model, as a weightless skeleton)."""
        checked = self.check()
        # A structural skeleton (no model code imported) serves unless a pass's plan-time checks
        # run the model's forward.
        structural = not any(step.pass_cls.plan_needs_code for step in checked.steps)
        subject = subject_for(checked, model, skeleton=not isinstance(model, (nn.Module,
                                                                             LoadedModel)),
                              structural=structural)
        models = {checked.subject.name: subject.model} if checked.subject else {}
        for name, decl in checked.models.items():
            if name not in models:
                models[name] = load_skeleton(decl.source, structural=structural).model
        return bind(checked, subject.model, subject_source=subject.source,
                    skeleton=subject.is_skeleton, models=models)

    def apply(self, model: str | nn.Module | LoadedModel | None = None, *, seed: int = 0,
              output: str | Path | None = None, progress: Progress | None = None,
              trust_pickle: bool = False) -> Result:
        """Run the script on ``model`` (default: load the script's model). The model is edited
        in place; outputs are written only if every expectation holds."""
        checked = self.check()
        subject = subject_for(checked, model, skeleton=False, trust_pickle=trust_pickle)
        runner = Runner(checked, seed=seed, progress=progress, trust_pickle=trust_pickle)
        loaded = load_models(checked, subject, progress=runner.progress,
                             trust_pickle=trust_pickle)
        return runner.run(plan_for(checked, loaded),
                          loaded, output=str(output) if output is not None else None)

    def to_text(self) -> str:
        from surgery.printer import to_text

        return to_text(self.ast)


def compile(text_or_path: str | Path) -> Program:
    """Parse a script given as text or as a path to a .surg file."""
    p = Path(text_or_path) if not isinstance(text_or_path, Path) else text_or_path
    if isinstance(text_or_path, Path) or (
            "\n" not in str(text_or_path) and str(text_or_path).endswith(".surg")):
        from surgery.diagnostics import error

        if not p.exists():
            raise error("E0602", f"script `{p}` does not exist")
        return Program(p.read_text(), str(p))
    return Program(str(text_or_path))


def apply(model: str | nn.Module | LoadedModel | None, text: str, **kwargs) -> Result:
    """Compile ``text`` and apply it to ``model``."""
    return compile(text).apply(model, **kwargs)
