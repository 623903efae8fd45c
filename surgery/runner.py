"""Running a plan: load data, run each step's pass, check expectations, run the output passes.

The runner executes the :class:`Plan` it is given, on the real model the plan was re-bound to
(``plan.rebind(model)``). Each step's pass returns the model it leaves (``PassResult``); the runner
installs it for the next step. Outputs (`export`, `save`) run only once every expectation held.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from surgery import atomic, distributed, expectations
from surgery.binder import Plan, PlanRow, bind
from surgery.check import CheckedProgram
from surgery.data import Dataset, corpus, text_file
from surgery.diagnostics import Diagnostic, SurgeryError, attach_source, did_you_mean
from surgery.emit import MAX_SHARD, PROVENANCE, STORED_DTYPES, Provenance, input_hashes
from surgery.expectations import ExpectationRecord
from surgery.models import LoadedModel, load_model, load_skeleton
from surgery.outputs import check_output
from surgery.passapi import (OUTPUT, ORIGINAL, ORIGINAL_MODEL, SCRIPT, PassError, RunContext,
                             StepReport, leaves)
from surgery.progress import Progress

@dataclass
class StepRecord:
    line: int
    statement: str
    verb: str
    method: str
    seconds: float
    report: StepReport

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "statement": self.statement, "verb": self.verb,
                "method": self.method, "seconds": round(self.seconds, 3),
                "report": self.report.to_json()}


@dataclass
class RunReport:
    plan: Plan
    steps: list[StepRecord] = field(default_factory=list)
    expectations: list[ExpectationRecord] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    streamed: dict[str, Any] | None = None  # a streamed run's measurements (surgery/executor)

    def to_json(self) -> dict[str, Any]:
        out = {"plan": self.plan.to_json(), "steps": [s.to_json() for s in self.steps],
               "expectations": [e.to_json() for e in self.expectations],
               "outputs": self.outputs}
        if self.streamed is not None:
            out["streamed"] = self.streamed
        return out


@dataclass
class Result:
    model: nn.Module
    report: RunReport


def load_data(program: CheckedProgram, tokenizer) -> dict[str, Dataset]:
    out = {}
    for name, d in program.data.items():
        load = corpus if d.kind == "corpus" else text_file
        try:
            out[name] = load(tokenizer, d.source, samples=d.samples, seqlen=d.seqlen,
                             seed=d.seed, name=name, eval_windows=d.eval_windows)
        except SurgeryError as e:
            raise attach_source(e, program.source, d.span)
    return out


def given_models(program: CheckedProgram, given: dict | None) -> dict[str, LoadedModel]:
    """Models the caller passes in by declared name (``models={"b": module}``), which replace
    what the script's declarations would load: nn.Modules, LoadedModels or source strings."""
    out = {}
    for name, model in (given or {}).items():
        if name not in program.models:
            raise SurgeryError(Diagnostic(
                "E0200", f"`models` names `{name}`, which the script does not declare", None,
                help=did_you_mean(name, program.models, listing="declared models")
                or f'declare it: model {name} = "hf:DIR"', source=program.source))
        out[name] = subject_for(program, model, skeleton=False)
    return out


def load_models(program: CheckedProgram, subject: LoadedModel, *, progress: Progress,
                trust_pickle: bool = False,
                given: dict[str, LoadedModel] | None = None) -> dict[str, LoadedModel]:
    """Every model the program uses, by name: the subject, and the models merges read
    (``given`` ones as they are, the others loaded from their declarations)."""
    needed: set[str] = set()
    for step in program.steps:
        needed |= set(getattr(step.params, "models", None) or [])
        needed |= set(model_refs(step)) - {ORIGINAL}  # e.g. distill(teacher=NAME)
        if getattr(step.params, "base", None):
            needed.add(step.params.base)
    name = program.subject.name if program.subject else "model"
    out = {name: subject}
    for other in sorted(needed - {name}):
        if given and other in given:
            out[other] = given[other]
            continue
        decl = program.models[other]
        with progress.task(f"loading model {other}"):
            try:
                out[other] = load_model(decl.source, trust_pickle=trust_pickle)
            except SurgeryError as e:
                raise attach_source(e, program.source, decl.span)
    return out


def model_refs(step) -> list[str]:
    """Model names a step's parameters refer to (`ModelRef` fields: a teacher ...)."""
    return [v for f in step.pass_cls.model_fields_named()
            if isinstance(v := getattr(step.params, f, None), str)]


def plan_for(program: CheckedProgram, loaded: dict[str, LoadedModel]) -> Plan:
    """Bind the program to the loaded models (on meta copies) and re-bind it to the real ones."""
    subject = next(iter(loaded.values()))
    plan = bind(program, subject.model, subject_source=subject.source,
                models={n: lm.model for n, lm in loaded.items()})
    return plan.rebind(subject.model)


class Runner:
    def __init__(self, program: CheckedProgram, *, seed: int = 0, progress: Progress | None = None,
                 trust_pickle: bool = False, dtype: torch.dtype | None = None,
                 max_shard_bytes: int | None = None):
        self.program = program
        self.dtype = dtype  # `--dtype`: the float dtype of the output (default: the input's)
        self.max_shard_bytes = max_shard_bytes
        self.seed = seed
        self.progress = progress or Progress()
        self.trust_pickle = trust_pickle

    def run(self, plan: Plan, loaded: dict[str, LoadedModel], *,
            output: str | None = None) -> Result:
        """Execute ``plan`` (re-bound to the first of ``loaded``, the subject). ``output``
        replaces the script's `save` path, or adds a save when the script has none."""
        program = self.program
        if plan.model is None:
            raise ValueError("the plan is not bound to a real model: call plan.rebind(model)")
        # distributed runs (surgery.distributed): only rank 0 writes, so only it claims the output
        check_output(program, output or program.save_path, plan.model,
                     claim=distributed.is_writer())
        for note in atomic.take_notes():  # leftovers of killed runs, cleaned up by the claim
            self.progress.log(f"note: {note}")
        torch.manual_seed(self.seed)
        subject_name = next(iter(loaded))
        tokenizer = next((lm.tokenizer for lm in loaded.values() if lm.tokenizer is not None),
                         None)
        with self.progress.task("loading data", total=None):
            data = load_data(program, tokenizer) if program.data else {}
        report = RunReport(plan)
        prov = Provenance(plan, self.seed, input_hashes(loaded), data, report.steps,
                          report.expectations, tokenizer)
        models = {n: lm.model for n, lm in loaded.items()}
        models[subject_name] = plan.model
        before = {}
        for exp in program.expectations:
            with self.progress.task(f"measuring {exp.metric} before (line {exp.line})"):
                before[exp.line] = expectations.measure_before(exp, plan.model, data)
        extras = {PROVENANCE: prov, OUTPUT: output or program.save_path,
                  SCRIPT: program.source.text if program.source else "",
                  MAX_SHARD: self.max_shard_bytes,
                  STORED_DTYPES: output_dtypes(loaded[subject_name], self.dtype)}
        if any(ORIGINAL in model_refs(s) for s in program.steps):  # e.g. distill(teacher=original)
            extras[ORIGINAL_MODEL] = copy.deepcopy(plan.model).eval()
        ctx = RunContext(model=plan.model, models=models, data=data, progress=self.progress,
                         seed=self.seed, model_sources={n: lm.source for n, lm in loaded.items()},
                         extras=extras)
        rows = _with_output(plan.steps, output)
        for row in (r for r in rows if not r.step.pass_cls.is_output):
            ctx = self._step(row, ctx, report, subject_name)
        report.expectations += expectations.check(program, ctx.model, data, before,
                                                  self.progress)
        distributed.agree()  # every rank succeeded before rank 0 writes anything
        for row in (r for r in rows if r.step.pass_cls.is_output and distributed.is_writer()):
            ctx = self._step(row, ctx, report, subject_name)
            report.outputs.append(str(row.step.params.path))
        return Result(ctx.model, report)

    def _step(self, row: PlanRow, ctx: RunContext, report: RunReport,
              subject_name: str) -> RunContext:
        step = row.step
        pass_obj = step.pass_cls(step.params)
        ctx = dataclasses.replace(ctx, line=step.line)
        if step.selector is None:  # a model pass acts on every leaf of the model as it is now
            targets = leaves(ctx.model)
        else:
            targets = {p: ctx.model.get_submodule(p) for p in row.modules}
        t0 = time.perf_counter()
        try:
            result = pass_obj.run(ctx, targets)
        except PassError as e:
            where = f" (module `{e.module}`)" if e.module else ""
            code = e.code or "E0801"  # a pass may name a more specific code
            raise SurgeryError(Diagnostic(code, f"{step.verb} using {step.method} failed"
                                          f"{where}: {e.message}", step.stmt.span, help=e.hint,
                                          source=self.program.source))
        report.steps.append(StepRecord(step.line, row.text, step.verb, step.method,
                                       time.perf_counter() - t0, result.report))
        ctx.models[subject_name] = result.model
        return dataclasses.replace(ctx, model=result.model)


def output_dtypes(subject: LoadedModel, override: torch.dtype | None) -> dict[str, torch.dtype]:
    """The dtype each input tensor is written back in: its stored one, or ``--dtype``."""
    if override is None:
        return dict(subject.stored_dtypes)
    return {k: (override if d.is_floating_point else d) for k, d in subject.stored_dtypes.items()}


def _with_output(rows: list[PlanRow], output: str | None) -> list[PlanRow]:
    """The plan's steps, with the `save` path replaced by ``output`` (or a save added)."""
    if output is None:
        return rows
    from surgery import registry

    saves = [r for r in rows if r.step.verb == "save"]
    cls = registry.default_pass("save")
    if saves:
        old = saves[0]
        step = dataclasses.replace(old.step, params=old.step.params.model_copy(
            update={"path": str(output)}))
        return [dataclasses.replace(r, step=step) if r is old else r for r in rows]
    last = rows[-1].step.stmt if rows else None
    step = _implicit_save(cls, output, last)
    return rows + [PlanRow(step.line, f'save "{output}"', step=step)]


def _implicit_save(cls, output: str, stmt):
    """A `save` step for an output path given to `apply` when the script has no `save`."""
    from surgery import ast
    from surgery.check import Step
    from surgery.ast import NO_SPAN

    span = stmt.span if stmt is not None else NO_SPAN
    node = ast.VerbStmt(verb="save", span=span, verb_span=span)
    return Step(node, "save", cls.method, cls, cls.Params(path=str(output)), None, span)


def subject_for(program: CheckedProgram, model, *, skeleton: bool, structural: bool = False,
                trust_pickle: bool = False) -> LoadedModel:
    """The model a program acts on: an explicit one (source string, LoadedModel or nn.Module),
    else the script's first `model` declaration."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, f"python:{type(model).__name__}")
    source = model
    span = None
    if source is None:
        decl = program.subject
        if decl is None:
            raise SurgeryError(Diagnostic(
                "E0205", "the script declares no model to operate on", None,
                help='add `model base = "zoo:smollm2-135m"` or pass --model', source=program.source))
        source, span = decl.source, decl.span
    try:
        if skeleton:
            return load_skeleton(source, structural=structural)
        return load_model(source, trust_pickle=trust_pickle)
    except SurgeryError as e:
        raise attach_source(e, program.source, span)
