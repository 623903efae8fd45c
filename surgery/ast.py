"""The AST: pydantic nodes, each with the source span it came from.

Spans are excluded from equality (``same_as``), so a program built by :class:`surgery.Script`
equals the program parsed from its printed text.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from surgery.source import Span

NO_SPAN = Span(line=0, col=0, end_line=0, end_col=0)


class Node(BaseModel):
    model_config = ConfigDict(frozen=True)

    span: Span = Field(default=NO_SPAN, repr=False)

    def structure(self) -> Any:
        """A span-free plain structure, for comparing programs."""
        return _strip(self.model_dump())


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("span", "name_span")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# ---------------------------------------------------------------- expressions

class Name(Node):
    kind: Literal["name"] = "name"
    id: str


class String(Node):
    kind: Literal["string"] = "string"
    value: str


class Number(Node):
    kind: Literal["number"] = "number"
    value: float
    text: str  # as written (keeps ints as ints when printed)

    @property
    def is_int(self) -> bool:
        return float(self.value).is_integer() and "." not in self.text and "e" not in self.text.lower()


class Bool(Node):
    kind: Literal["bool"] = "bool"
    value: bool


class Ratio(Node):
    kind: Literal["ratio"] = "ratio"
    n: int
    m: int


class Percent(Node):
    kind: Literal["percent"] = "percent"
    value: float
    text: str


class Count(Node):
    """A step count, written `200 steps` (or `1 step`)."""

    kind: Literal["count"] = "count"
    value: int
    text: str  # the number as written


class ListExpr(Node):
    kind: Literal["list"] = "list"
    items: list["Expr"]


class Keyword(Node):
    kind: Literal["keyword"] = "keyword"
    name: str
    value: "Expr"


class Call(Node):
    kind: Literal["call"] = "call"
    func: str
    func_span: Span = Field(default=NO_SPAN, repr=False)
    args: list["Expr"] = []
    kwargs: list[Keyword] = []

    def kwarg(self, name: str) -> Keyword | None:
        for kw in self.kwargs:
            if kw.name == name:
                return kw
        return None


class BinOp(Node):
    kind: Literal["binop"] = "binop"
    op: Literal["|", "&", "-", "+", "*", "/"]
    left: "Expr"
    right: "Expr"


class Neg(Node):
    kind: Literal["neg"] = "neg"
    operand: "Expr"


Expr = Union[Name, String, Number, Bool, Ratio, Percent, Count, ListExpr, Call, BinOp, Neg]


# ---------------------------------------------------------------- statements

class VersionStmt(Node):
    kind: Literal["version"] = "version"
    version: int


class ModelStmt(Node):
    kind: Literal["model"] = "model"
    name: str
    name_span: Span = Field(default=NO_SPAN, repr=False)
    source: Expr


class DataStmt(Node):
    kind: Literal["data"] = "data"
    name: str
    name_span: Span = Field(default=NO_SPAN, repr=False)
    source: Expr


class LetStmt(Node):
    kind: Literal["let"] = "let"
    name: str
    name_span: Span = Field(default=NO_SPAN, repr=False)
    value: Expr


class ExpectStmt(Node):
    kind: Literal["expect"] = "expect"
    left: Expr
    op: Literal["<=", ">=", "<", ">", "=="]
    right: Expr


class Clause(Node):
    kind: Literal["clause"] = "clause"
    prep: str  # a preposition of the verb table (surgery/verbs.py)
    operands: list[Expr]


class VerbStmt(Node):
    kind: Literal["verb"] = "verb"
    verb: str  # a verb of the verb table (surgery/verbs.py)
    verb_span: Span = Field(default=NO_SPAN, repr=False)
    operands: list[Expr] = []
    clauses: list[Clause] = []
    using: Call | None = None

    def clause(self, prep: str) -> Clause | None:
        for c in self.clauses:
            if c.prep == prep:
                return c
        return None


Stmt = Union[VersionStmt, ModelStmt, DataStmt, LetStmt, ExpectStmt, VerbStmt]


class ScriptNode(Node):
    """The root of a parsed script (``surgery.Program`` is the compiled, checkable script)."""

    kind: Literal["script"] = "script"
    statements: list[Stmt] = []

    def same_as(self, other: "ScriptNode") -> bool:
        return self.structure() == other.structure()


for _cls in (ListExpr, Keyword, Call, BinOp, Neg, ModelStmt, DataStmt, LetStmt, ExpectStmt, Clause,
             VerbStmt, ScriptNode):
    _cls.model_rebuild()
