"""Binding: a checked program + a model (real or meta-device skeleton) -> Plan.

Binding works on a meta-device copy of the model (the input is never modified) and simulates the
script on it: every selector is resolved to concrete module paths, each pass checks shapes and
divisibility on its targets, the order of passes is checked against module states, and then the
pass applies its *structural* effect to the copy (``Pass.rewrite_skeleton``: quantize puts
QuantLinear skeletons in place, adapt wraps layers, merge swaps in the merged architecture ...).
So a selector written after `adapt` resolves against the adapter wrappers, exactly as it will at
run time. No weights are read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.check import CheckedProgram, Expectation, Step
from surgery.diagnostics import Diagnostic, Label, SurgeryError
from surgery.expectations import literal_problems
from surgery.passapi import MachineProblem, ModelPass, ModulePass, ShapeProblem, State, leaves
from surgery.selectors import SetOp, resolve


@dataclass
class PlanRow:
    """One statement of the plan: a step (with its targets) or an expectation."""

    line: int
    text: str
    step: Step | None = None
    expectation: Expectation | None = None
    modules: list[str] = field(default_factory=list)
    parameters: int = 0
    memory_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "statement": self.text}
        if self.step is not None:
            out |= {"verb": self.step.verb, "method": self.step.method,
                    "granularity": self.step.pass_cls.granularity.value,
                    "params": self.step.params.model_dump(mode="json")}
        else:
            out["verb"] = "expect"
        return out | {"modules": self.modules, "parameters": self.parameters,
                      "memory_bytes": self.memory_bytes, "notes": self.notes}


@dataclass
class Plan:
    program: CheckedProgram
    rows: list[PlanRow]  # every statement that does something, in line order
    subject_source: str
    skeleton: bool
    states: dict[str, dict[State, int]]  # module path -> state -> line that produced it
    input_structure: list[tuple[str, str]]  # (path, class name) of the model it was bound to
    result: nn.Module | None = None  # the meta-device model after every step (simulated)
    model: nn.Module | None = None  # the real model the steps run on, set by `rebind`

    @property
    def steps(self) -> list[PlanRow]:
        return [r for r in self.rows if r.step is not None]

    def rebind(self, model: nn.Module) -> "Plan":
        """Attach the real model the plan will run on. It must have the structure the plan was
        bound to (same module paths and classes), so every row's targets exist in it."""
        real = structure(model)
        if real != self.input_structure:
            have, want = dict(real), dict(self.input_structure)
            diff = next((p for p in want if have.get(p) != want[p]),
                        next((p for p in have if p not in want), "?"))
            raise SurgeryError(Diagnostic(
                "E0604", f"the model does not have the structure the plan was made for "
                         f"(first difference at `{diff or '<root>'}`: plan has "
                         f"{want.get(diff, 'nothing')}, model has {have.get(diff, 'nothing')})",
                None, help="plan and run on the same model", source=self.program.source))
        self.model = model
        return self

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject_source, "skeleton": self.skeleton,
                "steps": [r.to_json() for r in self.rows],
                "states": {p: sorted(s.value for s in st) for p, st in sorted(self.states.items())
                           if st}}


def structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(p, type(m).__name__) for p, m in model.named_modules()]


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors (no tensor data is copied)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            m = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


def statement_text(program: CheckedProgram, stmt) -> str:
    span = stmt.span
    return " ".join(program.source.text[span.start:span.end].split())


def _expand(pass_obj: ModulePass, model: nn.Module, paths: list[str]) -> list[str]:
    """Keep selected leaves; replace other selected modules by their outermost leaf descendants
    (the layers inside an adapter wrapper belong to the wrapper)."""
    if not getattr(pass_obj, "leaf_types", ()):
        return paths
    out: list[str] = []
    seen = set()
    for p in paths:
        mod = model.get_submodule(p)
        if pass_obj.is_leaf(mod):
            cands = [p]
        else:
            cands, inside = [], []
            for n, m in mod.named_modules():
                if n and pass_obj.is_leaf(m) and not any(n.startswith(i + ".") for i in inside):
                    cands.append(f"{p}.{n}")
                    inside.append(n)
        for c in cands:
            if c not in seen:
                seen.add(c)
                out.append(c)
    # a selected leaf inside another selected leaf (`base_layer` inside its wrapper) goes with it
    return [c for c in out if not any(a in seen for a in _ancestors(c))]


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _group_reasons(problems: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path, reason in problems:
        grouped.setdefault(reason, []).append(path)
    return grouped


def _module_list(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _allows_empty(sel) -> bool:
    if isinstance(sel, SetOp):
        return _allows_empty(sel.left) or _allows_empty(sel.right)
    return bool(getattr(sel, "allow_empty", False))


def _targets(step: Step, pass_obj, work: nn.Module, original: nn.Module,
             diags: list[Diagnostic]):
    """The paths a step acts on in the simulated model, or None after a reported problem. A
    third result, when set, is the diagnostic for paths the step cannot act on, unless an order
    problem (an earlier step replaced or changed those modules) explains it better."""
    if isinstance(pass_obj, ModelPass):  # a model pass acts on every leaf of the subject
        return list(leaves(work)), None
    sel_diags = step.selector.problems(work, [n for n, _ in work.named_modules() if n])
    if sel_diags:
        diags.extend(sel_diags)
        return None, None
    paths = resolve(step.selector, work)
    if not paths and not _allows_empty(step.selector):
        gone = resolve(step.selector, original)  # what it matched before earlier steps ran
        return _expand(pass_obj, original, gone) or gone, Diagnostic(
            "E0400", "the selector matches no module" + (
                f" any more: earlier steps replaced {_module_list(gone)}" if gone else ""),
            step.selector.span, help="write allow_empty=true if that is intended")
    targets = _expand(pass_obj, work, paths)
    if paths and not targets:
        names = [t.__name__ for t in pass_obj.leaf_types]
        kinds = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
        return paths, Diagnostic(
            "E0401", f"the selector matches {len(paths)} module(s) but none is a {kinds}, "
                     f"which `{step.verb} ... {step.method}` works on", step.selector.span,
            help=f"matched {_module_list(paths)}")
    return targets, None


def bind(program: CheckedProgram, model: nn.Module, *, subject_source: str = "<module>",
         skeleton: bool = False, models: dict[str, nn.Module] | None = None) -> Plan:
    """Simulate ``program`` on a meta copy of ``model``; ``models`` holds every declared model
    (the subject included) for merges."""
    diags: list[Diagnostic] = []
    rows: list[PlanRow] = []
    states: dict[str, dict[State, int]] = {}
    subject = program.subject.name if program.subject else None
    work = meta_copy(model)
    sims = {n: (work if n == subject else meta_copy(m)) for n, m in (models or {}).items()}

    diags += literal_problems(program)
    for decl in program.data.values():
        if decl.kind == "text" and not Path(decl.source).exists():
            diags.append(Diagnostic("E0602", f"text file `{decl.source}` does not exist",
                                    decl.span, help="paths are relative to the working directory"))

    for step in program.steps:
        pass_obj = step.pass_cls(step.params)
        targets, unusable = _targets(step, pass_obj, work, model, diags)
        if targets is None:
            continue
        if unusable is not None:  # report the order problem if there is one, else `unusable`
            found = _check_states(pass_obj, step, dict.fromkeys(targets), states, program)
            diags.extend(found or [unusable])
            continue
        if pass_obj.requires:
            # A pass that needs a state (merge adapters) acts where that state is; it is an
            # error only if no selected module has it (reported by the state check below).
            having = [p for p in targets if pass_obj.requires <= set(_states_at(p, states))]
            targets = having or targets
        modules = {p: work.get_submodule(p) for p in targets}
        before = len(diags)
        # An order problem explains the rest (a quantized base cannot take a float merge ...)
        diags.extend(_check_states(pass_obj, step, modules, states, program))
        if len(diags) == before and isinstance(pass_obj, ModelPass):
            diags += [Diagnostic("E0604", prob, step.stmt.span)
                      for prob in pass_obj.check_models(sims)]
        problems = [] if len(diags) > before else \
            [(p, r) for p, m in modules.items() if (r := pass_obj.check_module(p, m))]
        for reason, bad in _group_reasons(problems).items():
            if isinstance(reason, MachineProblem):  # the machine, not the modules, is the problem
                diags.append(Diagnostic("E0803", reason, step.stmt.span, help=reason.hint))
                continue
            code = "E0402" if isinstance(reason, ShapeProblem) else "E0401"
            diags.append(Diagnostic(code, f"cannot {step.verb} {_module_list(bad)}: {reason}",
                                    step.stmt.span,
                                    help=f"{len(bad)} of {len(modules)} selected modules are "
                                         "affected; narrow the selector or change the parameters"))
        if not problems and len(diags) == before and modules:
            whole = pass_obj.check_targets(modules)  # a budget or count over all targets
            if whole:
                diags.append(Diagnostic(getattr(whole, "code", "E0401"), whole, step.stmt.span,
                                        help=getattr(whole, "hint", None)))
        params = pass_obj.affected_parameters(modules)
        mem = params * 4 + pass_obj.estimate_memory(modules)
        rows.append(PlanRow(step.line, statement_text(program, step.stmt), step=step,
                            modules=targets, parameters=params, memory_bytes=mem))
        if len(diags) == before:
            work = pass_obj.rewrite_skeleton(work, modules, sims)
            if subject is not None:
                sims[subject] = work
            if isinstance(pass_obj, ModelPass) and pass_obj.produces:
                states.clear()  # a merge builds a new model: only what it produces holds
                states.update({p: {st: step.line for st in pass_obj.produces}
                               for p in leaves(work)})
    if diags:
        raise SurgeryError(diags).with_source(program.source)
    rows += [PlanRow(e.line, statement_text(program, e.stmt), expectation=e)
             for e in program.expectations]
    rows.sort(key=lambda r: r.line)
    return Plan(program, rows, subject_source, skeleton, states, structure(model), work)


_PAST = {State.MASKED: "pruned", State.QUANTIZED: "quantized", State.ADAPTED: "given adapters",
         State.SWAPPED: "attention-swapped", State.LOWERED: "lowered", State.MERGED: "merged",
         State.COMPENSATED: "compensated"}


def _states_at(path: str, states: dict[str, dict[State, int]]) -> dict[State, int]:
    """States of ``path`` and of the modules around it: a layer inside an adapter wrapper or a
    swapped attention block is inside that state too."""
    parts = path.split(".")
    out: dict[State, int] = {}
    for i in range(len(parts) + 1):
        for st, line in states.get(".".join(parts[:i]) if i else "", {}).items():
            out.setdefault(st, line)
    return out


def _check_states(pass_obj, step: Step, modules: dict[str, nn.Module],
                  states: dict[str, dict[State, int]], program: CheckedProgram) -> list[Diagnostic]:
    cls = pass_obj  # instance attributes may refine the class's declarations (e.g. bone bat)
    # (problem kind, state, line) -> module paths
    bad: dict[tuple[str, State, int], list[str]] = {}
    for path in modules:
        have = _states_at(path, states)
        for st in cls.requires:
            if st not in have:
                bad.setdefault(("missing", st, 0), []).append(path)
        for st, line in have.items():
            if st not in cls.accepts and st not in cls.requires:
                bad.setdefault(("refused", st, line), []).append(path)
            elif not cls.accepts_only_with.get(st, frozenset()) <= set(have):
                bad.setdefault(("refused", st, line), []).append(path)  # QLoRA: only through adapters
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
    if not diags and not isinstance(pass_obj, ModelPass):
        for path in modules:
            have = states.setdefault(path, {})
            for st in cls.consumes:
                have.pop(st, None)
            for st in cls.produces:
                have[st] = step.line
    return diags
