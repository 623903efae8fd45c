"""Binding: a checked program + a model (real or meta-device skeleton) -> Plan.

Every selector is resolved to concrete module paths, each pass checks shapes and divisibility on
its targets, the order of passes is checked against module states, and memory is estimated. No
weights are read: this runs on the skeleton in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from surgery.check import CheckedProgram, Step
from surgery.diagnostics import Diagnostic, Label, SurgeryError
from surgery.passapi import MachineProblem, ModelPass, ModulePass, ShapeProblem, State
from surgery.selectors import resolve


@dataclass
class PlanRow:
    step: Step
    modules: list[str]
    parameters: int
    memory_bytes: int
    text: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def line(self) -> int:
        return self.step.line

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "statement": self.text, "verb": self.step.verb,
                "method": self.step.method, "modules": self.modules,
                "parameters": self.parameters, "memory_bytes": self.memory_bytes,
                "params": self.step.params.model_dump(mode="json"), "notes": self.notes}


@dataclass
class Plan:
    program: CheckedProgram
    rows: list[PlanRow]
    subject_source: str
    skeleton: bool
    states: dict[str, dict[State, int]]  # module path -> state -> line that produced it

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject_source, "skeleton": self.skeleton,
                "steps": [r.to_json() for r in self.rows],
                "states": {p: sorted(s.value for s in st) for p, st in sorted(self.states.items())
                           if st}}


def statement_text(program: CheckedProgram, step: Step) -> str:
    span = step.stmt.span
    return " ".join(program.source.text[span.start:span.end].split())


def _expand(pass_obj: ModulePass, model: nn.Module, paths: list[str]) -> list[str]:
    """Keep selected leaves; replace other selected modules by their leaf descendants."""
    if not getattr(pass_obj, "leaf_types", ()):
        return paths
    out: list[str] = []
    seen = set()
    for p in paths:
        mod = model.get_submodule(p)
        if pass_obj.is_leaf(mod):
            cands = [p]
        else:
            cands = [f"{p}.{n}" for n, m in mod.named_modules() if n and pass_obj.is_leaf(m)]
        for c in cands:
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def _group_reasons(problems: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path, reason in problems:
        grouped.setdefault(reason, []).append(path)
    return grouped


def _module_list(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def bind(program: CheckedProgram, model: nn.Module, *, subject_source: str = "<module>",
         skeleton: bool = False, models: dict[str, nn.Module] | None = None) -> Plan:
    diags: list[Diagnostic] = []
    rows: list[PlanRow] = []
    states: dict[str, dict[State, int]] = {}
    models = models or {}

    for decl in program.data.values():
        if decl.kind == "text" and not Path(decl.source).exists():
            diags.append(Diagnostic("E0602", f"text file `{decl.source}` does not exist",
                                    decl.span, help="paths are relative to the working directory"))

    for step in program.steps:
        text = statement_text(program, step)
        pass_obj = step.pass_cls(step.params)
        if isinstance(pass_obj, ModelPass) or step.selector is None:
            problems = []
            if isinstance(pass_obj, ModelPass) and models:
                problems = pass_obj.check_models(models)
            for prob in problems:
                diags.append(Diagnostic("E0604", prob, step.stmt.span))
            rows.append(PlanRow(step, [], 0, pass_obj.estimate_memory({}), text))
            continue
        sel_diags = step.selector.problems(model, [n for n, _ in model.named_modules() if n])
        if sel_diags:
            diags.extend(sel_diags)
            continue
        paths = resolve(step.selector, model)
        targets = _expand(pass_obj, model, paths)
        if paths and not targets:
            names = [t.__name__ for t in pass_obj.leaf_types]
            kinds = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
            diags.append(Diagnostic(
                "E0401", f"the selector matches {len(paths)} module(s) but none is a {kinds}, "
                         f"which `{step.verb} ... {step.method}` works on", step.selector.span,
                help=f"matched {_module_list(paths)}"))
            continue
        if pass_obj.requires:
            # A pass that needs a state (merge adapters) acts where that state is; it is an
            # error only if no selected module has it (reported by the state check below).
            need = pass_obj.requires
            having = [p for p in targets if need <= set(states.get(p, {}))]
            targets = having or targets
        modules = {p: model.get_submodule(p) for p in targets}
        problems = [(p, r) for p, m in modules.items() if (r := pass_obj.check_module(p, m))]
        for reason, bad in _group_reasons(problems).items():
            if isinstance(reason, MachineProblem):  # the machine, not the modules, is the problem
                diags.append(Diagnostic("E0803", reason, step.stmt.span, help=reason.hint))
                continue
            code = "E0402" if isinstance(reason, ShapeProblem) else "E0401"
            diags.append(Diagnostic(code, f"cannot {step.verb} {_module_list(bad)}: {reason}",
                                    step.stmt.span,
                                    help=f"{len(bad)} of {len(modules)} selected modules are "
                                         "affected; narrow the selector or change the parameters"))
        diags.extend(_check_states(pass_obj, step, modules, states, program))
        params = pass_obj.affected_parameters(modules)
        mem = params * 4 + pass_obj.estimate_memory(modules)
        rows.append(PlanRow(step, targets, params, mem, text))
    if diags:
        for d in diags:
            d.source = program.source
        raise SurgeryError(diags)
    return Plan(program, rows, subject_source, skeleton, states)


_PAST = {State.MASKED: "pruned", State.QUANTIZED: "quantized", State.ADAPTED: "given adapters",
         State.SWAPPED: "attention-swapped", State.LOWERED: "lowered", State.MERGED: "merged"}


def _check_states(pass_obj, step: Step, modules: dict[str, nn.Module],
                  states: dict[str, dict[State, int]], program: CheckedProgram) -> list[Diagnostic]:
    cls = pass_obj  # instance attributes may refine the class's declarations (e.g. bone bat)
    # (problem kind, state, line) -> module paths
    bad: dict[tuple[str, State, int], list[str]] = {}
    for path in modules:
        have = states.setdefault(path, {})
        for st in cls.requires:
            if st not in have:
                bad.setdefault(("missing", st, 0), []).append(path)
        for st, line in have.items():
            if st not in cls.accepts and st not in cls.requires:
                bad.setdefault(("refused", st, line), []).append(path)
    diags = []
    lines = {s.line: s for s in program.steps}
    for (kind, st, line), paths in bad.items():
        if kind == "missing":
            diags.append(Diagnostic(
                "E0500", f"`{step.verb}` needs {st.value} modules, but "
                         f"{_module_list(paths)} {'is' if len(paths) == 1 else 'are'} not "
                         f"{st.value}", step.stmt.span,
                help=f"add the step that makes them {st.value} earlier in the script"))
            continue
        reason = cls.refusals.get(st, f"`{step.verb} using {step.method}` does not accept "
                                      f"{st.value} modules")
        earlier = lines.get(line)
        label = [Label(earlier.stmt.span, f"{_PAST[st]} here")] if earlier else []
        diags.append(Diagnostic(
            "E0500", f"cannot {step.verb} {_module_list(paths)}: "
                     f"{'it was' if len(paths) == 1 else 'they were'} {_PAST[st]} at line "
                     f"{line}", step.stmt.span, help=reason, labels=label))
    if not diags:
        for path in modules:
            have = states[path]
            for st in cls.consumes:
                have.pop(st, None)
            for st in cls.produces:
                have[st] = step.line
    return diags
