"""Running a plan: load data, apply each pass, check expectations, write outputs."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery import atomic, evaluate
from surgery.binder import Plan, bind
from surgery.check import CheckedProgram, Expectation
from surgery.expectations import evaluate_bound
from surgery.data import Dataset, corpus, text_file
from surgery.diagnostics import Diagnostic, SurgeryError
from surgery.models import LoadedModel, load_model, load_skeleton, sha256_file
from surgery.passapi import ModelPass, PassError, RunContext, StepReport
from surgery.outputs import check_output
from surgery.progress import Progress

AGREEMENT_WINDOWS = 4  # evaluation windows used by max_abs_diff / cosine


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
class ExpectationRecord:
    line: int
    statement: str
    value: float
    bound: float
    original: float | None
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "statement": self.statement, "value": self.value,
                "bound": self.bound, "original": self.original, "passed": self.passed}


@dataclass
class RunReport:
    plan: Plan
    steps: list[StepRecord] = field(default_factory=list)
    expectations: list[ExpectationRecord] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan.to_json(), "steps": [s.to_json() for s in self.steps],
                "expectations": [e.to_json() for e in self.expectations],
                "outputs": self.outputs}


@dataclass
class Result:
    model: nn.Module
    report: RunReport


def load_data(program: CheckedProgram, tokenizer) -> dict[str, Dataset]:
    out = {}
    for name, d in program.data.items():
        try:
            if d.kind == "corpus":
                out[name] = corpus(tokenizer, d.source, samples=d.samples, seqlen=d.seqlen,
                                   seed=d.seed, name=name, eval_windows=d.eval_windows)
            else:
                out[name] = text_file(tokenizer, d.source, samples=d.samples, seqlen=d.seqlen,
                                      seed=d.seed, name=name, eval_windows=d.eval_windows)
        except SurgeryError as e:
            for diag in e.diagnostics:
                diag.span = diag.span or d.span
                diag.source = program.source
            raise SurgeryError(e.diagnostics)
    return out


def _metric_before(exp: Expectation, model: nn.Module, data: dict[str, Dataset]):
    ds = data[exp.data]
    if exp.metric == "perplexity":
        return evaluate.perplexity(model, ds.evaluation)
    return evaluate.outputs(model, ds.evaluation[:AGREEMENT_WINDOWS])


def _metric_after(exp: Expectation, model: nn.Module, data, before) -> tuple[float, float | None]:
    ds = data[exp.data]
    if exp.metric == "perplexity":
        return evaluate.perplexity(model, ds.evaluation), before
    after = evaluate.outputs(model, ds.evaluation[:AGREEMENT_WINDOWS])
    fn = evaluate.max_abs_diff if exp.metric == "max_abs_diff" else evaluate.cosine
    return fn(after, before), None


_COMPARE = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
            ">": lambda a, b: a > b, "==": lambda a, b: a == b}


def input_hashes(loaded: dict[str, LoadedModel]) -> dict[str, Any]:
    out = {}
    for name, lm in loaded.items():
        out[name] = {"source": lm.source,
                     "files": {Path(f).name: sha256_file(Path(f)) for f in lm.files}}
    return out


class Runner:
    def __init__(self, program: CheckedProgram, *, seed: int = 0, progress: Progress | None = None,
                 trust_pickle: bool = False):
        self.program = program
        self.seed = seed
        self.progress = progress or Progress()
        self.trust_pickle = trust_pickle

    def run(self, subject: LoadedModel, *, output: str | None = None) -> Result:
        program = self.program
        check_output(program, output or program.save_path, subject.model, claim=True)
        for note in atomic.take_notes():  # leftovers of killed runs, cleaned up by the claim
            self.progress.log(f"note: {note}")
        torch.manual_seed(self.seed)
        others = self._other_models(subject)
        subject_name = program.subject.name if program.subject else "model"
        plan = bind(program, subject.model, subject_source=subject.source,
                    models={subject_name: subject.model, **{n: lm.model for n, lm in others.items()}}
                    if others else None)
        tokenizer = subject.tokenizer or next((lm.tokenizer for lm in others.values()
                                               if lm.tokenizer is not None), None)
        with self.progress.task("loading data", total=None):
            data = load_data(program, tokenizer) if program.data else {}
        report = RunReport(plan)
        before = {}
        for exp in program.expectations:
            with self.progress.task(f"measuring {exp.metric} before (line {exp.line})"):
                before[exp.line] = _metric_before(exp, subject.model, data)
        ctx = RunContext(model=subject.model,
                         models={subject_name: subject.model, **{n: lm.model for n, lm in others.items()}},
                         data=data, progress=self.progress, seed=self.seed,
                         model_sources={subject_name: subject.source,
                                        **{n: lm.source for n, lm in others.items()}})
        outputs = [row for row in plan.rows if row.step.is_output]
        for row in plan.rows:
            if row.step.is_output:
                continue
            report.steps.append(self._apply(row, ctx))
        model = ctx.model
        self._check_expectations(report, model, data, before)
        for row in outputs:
            if row.step.verb == "save":  # written below, with the manifest
                continue
            report.steps.append(self._apply(row, ctx))
            report.outputs.append(row.step.params.path)
        save_path = output or program.save_path
        if save_path is not None:
            from surgery.emit import save

            manifest = {"script": program.source.text, "script_name": program.source.name,
                        "seed": self.seed, "inputs": input_hashes({subject_name: subject, **others}),
                        "data": {n: {"description": d.description, **d.meta} for n, d in data.items()},
                        "plan": plan.to_json(),
                        "steps": [s.to_json() | {"seconds": None} for s in report.steps],
                        "expectations": [e.to_json() for e in report.expectations]}
            with self.progress.task(f"saving {save_path}"):
                save(model, save_path, manifest, tokenizer=tokenizer)
            report.outputs.append(str(save_path))
        return Result(model, report)

    def _other_models(self, subject: LoadedModel) -> dict[str, LoadedModel]:
        program = self.program
        needed = set()
        for step in program.steps:
            if isinstance(getattr(step.params, "models", None), list):
                needed |= set(step.params.models)
            if getattr(step.params, "base", None):
                needed.add(step.params.base)
        subject_name = program.subject.name if program.subject else None
        out = {}
        for name in sorted(needed - {subject_name}):
            decl = program.models[name]
            with self.progress.task(f"loading model {name}"):
                out[name] = self._load(decl)
        return out

    def _load(self, decl) -> LoadedModel:
        try:
            return load_model(decl.source, trust_pickle=self.trust_pickle)
        except SurgeryError as e:
            for diag in e.diagnostics:
                diag.span = diag.span or decl.span
                diag.source = self.program.source
            raise SurgeryError(e.diagnostics)

    def _apply(self, row, ctx: RunContext) -> StepRecord:
        step = row.step
        pass_obj = step.pass_cls(step.params)
        ctx.line = step.line
        modules = {p: ctx.model.get_submodule(p) for p in row.modules}
        t0 = time.perf_counter()
        try:
            rep = pass_obj.apply(ctx, modules) if modules or isinstance(pass_obj, ModelPass) \
                else pass_obj.apply(ctx, {})
        except PassError as e:
            where = f" (module `{e.module}`)" if e.module else ""
            raise SurgeryError(Diagnostic("E0801", f"{step.verb} using {step.method} failed"
                                          f"{where}: {e.message}", step.stmt.span, help=e.hint,
                                          source=self.program.source))
        return StepRecord(step.line, row.text, step.verb, step.method,
                          time.perf_counter() - t0, rep or StepReport())

    def _check_expectations(self, report: RunReport, model, data, before) -> None:
        failed = []
        for exp in self.program.expectations:
            with self.progress.task(f"checking expectation at line {exp.line}"):
                value, original = _metric_after(exp, model, data, before[exp.line])
            bound = evaluate_bound(exp.bound, original)
            ok = _COMPARE[exp.op](value, bound)
            span = exp.stmt.span
            text = " ".join(self.program.source.text[span.start:span.end].split())
            report.expectations.append(ExpectationRecord(exp.line, text, value, bound, original, ok))
            if not ok:
                orig = f" (original {original:.4g})" if original is not None else ""
                failed.append(Diagnostic(
                    "E0800", f"expectation failed: {exp.metric}({exp.data}) = {value:.6g}, "
                             f"bound {exp.op} {bound:.6g}{orig}", span,
                    help="no artifact was written; relax the bound or change the recipe",
                    source=self.program.source))
        if failed:
            raise SurgeryError(failed)


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
        for diag in e.diagnostics:
            diag.span = diag.span or span
            diag.source = program.source
        raise SurgeryError(e.diagnostics)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
