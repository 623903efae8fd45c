"""What the checker produces: a program whose names are resolved and whose passes are bound to
validated parameters, plus the shared state the checking modules write into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surgery import ast
from surgery.diagnostics import Code, Diagnostic, Label
from surgery.passapi import Pass
from surgery.selectors import Selector
from surgery.source import SourceFile, Span

LANGUAGE_VERSION = 1


@dataclass
class ModelDecl:
    name: str
    source: str
    span: Span


@dataclass
class DataDecl:
    name: str
    kind: str  # corpus | text
    source: str  # corpus name or file path
    samples: int
    seqlen: int
    seed: int
    span: Span
    eval_windows: int | None = None


@dataclass
class Step:
    """One transforming or output statement bound to its pass."""

    stmt: ast.VerbStmt
    verb: str
    method: str
    pass_cls: type[Pass]
    params: Any
    selector: Selector | None  # module target (None for passes over the whole model)
    method_span: Span

    @property
    def line(self) -> int:
        return self.stmt.span.line

    @property
    def is_output(self) -> bool:
        return self.verb in ("export", "save")


@dataclass
class Expectation:
    stmt: ast.ExpectStmt
    metric: str
    data: str
    op: str
    bound: ast.Expr  # numbers and `original`

    @property
    def line(self) -> int:
        return self.stmt.span.line


@dataclass
class CheckedProgram:
    source: SourceFile
    ast: ast.ScriptNode
    version: int = LANGUAGE_VERSION
    models: dict[str, ModelDecl] = field(default_factory=dict)
    data: dict[str, DataDecl] = field(default_factory=dict)
    lets: dict[str, Selector] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    expectations: list[Expectation] = field(default_factory=list)

    @property
    def subject(self) -> ModelDecl | None:
        return next(iter(self.models.values()), None)

    @property
    def save_step(self) -> Step | None:
        return next((s for s in self.steps if s.verb == "save"), None)

    @property
    def save_path(self) -> str | None:
        step = self.save_step
        return step.params.path if step is not None else None

    @property
    def save_span(self) -> Span | None:
        step = self.save_step
        return step.stmt.span if step is not None else None


class Checking:
    """The state shared by the checking modules while one script is checked."""

    def __init__(self, program: ast.ScriptNode, source: SourceFile):
        self.out = CheckedProgram(source=source, ast=program)
        self.diagnostics: list[Diagnostic] = []
        self.declared: dict[str, tuple[str, Span]] = {}  # name -> (kind, span)

    def add(self, code: Code, message: str, span: Span | None, help: str | None = None,
            labels=()) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, help=help, labels=list(labels)))

    def declare(self, name: str, kind: str, span: Span) -> bool:
        if name in self.declared:
            prev_kind, prev = self.declared[name]
            self.add(Code.E0202, f"`{name}` is already declared (as {prev_kind})", span,
                     help="give each model, data set and selector its own name",
                     labels=[Label(prev, "first declared here")])
            return False
        self.declared[name] = (kind, span)
        return True
