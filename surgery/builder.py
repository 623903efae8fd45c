"""Build scripts from Python: the same AST as the parser produces, printable back to text.

    Script().model("base", "zoo:smollm2-135m") \\
            .quantize("type(Linear) - modules('lm_head')", to="int8").to_text()

Selector and value arguments given as strings are parsed with the language's own grammar, so a
builder program and its printed text parse to equal ASTs. Method keyword values: Python numbers,
booleans and lists become literals; strings become string literals, except names of declared
models/data (and `Ref("x")`) which become names; "2:4" and "50%" in `to=` become patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery import ast
from surgery.parser import parse
from surgery.printer import to_text


@dataclass(frozen=True)
class Ref:
    """A bare name in a builder value (e.g. a data declaration or `init=Ref("gaussian")`)."""

    name: str


def _expr(text: str) -> ast.Expr:
    return parse(f"let _ = {text}").statements[0].value


class Script:
    def __init__(self):
        self._stmts: list[str] = []
        self._names: set[str] = set()

    # values -> source text
    def _value(self, v: Any) -> str:
        if isinstance(v, Ref):
            return v.name
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(self._value(x) for x in v) + "]"
        if isinstance(v, str):
            return v if v in self._names else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        raise TypeError(f"unsupported builder value {v!r}")

    def _call(self, name: str, kwargs: dict[str, Any]) -> str:
        return f"{name}(" + ", ".join(f"{k}={self._value(v)}" for k, v in kwargs.items()) + ")"

    def _sel(self, selector: str) -> str:
        from surgery.printer import expr_text

        return expr_text(_expr(selector))

    def _add(self, text: str) -> "Script":
        self._stmts.append(text)
        return self

    # statements
    def version(self, n: int = 1) -> "Script":
        return self._add(f"surgery {n}")

    def model(self, name: str, source: str) -> "Script":
        self._names.add(name)
        return self._add(f"model {name} = {self._value(source)}")

    def data(self, name: str, source: str = "pydoc", *, kind: str = "corpus", **kw) -> "Script":
        self._names.add(name)
        return self._add(f"data {name} = {kind}({self._value(source)}"
                         + "".join(f", {k}={self._value(v)}" for k, v in kw.items()) + ")")

    def let(self, name: str, selector: str) -> "Script":
        self._names.add(name)
        return self._add(f"let {name} = {self._sel(selector)}")

    def quantize(self, selector: str, *, to: str, using: str | None = None, **kw) -> "Script":
        tail = f" using {self._call(using, kw)}" if using else ""
        return self._add(f"quantize {self._sel(selector)} to {to}{tail}")

    def prune(self, selector: str, *, to: str, using: str | None = None, **kw) -> "Script":
        tail = f" using {self._call(using, kw)}" if using else ""
        return self._add(f"prune {self._sel(selector)} to {to}{tail}")

    def adapt(self, selector: str, *, with_: str, **kw) -> "Script":
        return self._add(f"adapt {self._sel(selector)} with {self._call(with_, kw)}")

    def swap(self, op: str, *, in_: str, for_: str, **kw) -> "Script":
        return self._add(f"swap {op} in {self._sel(in_)} for {self._call(for_, kw)}")

    def merge(self, *models: str, using: str, into: str | None = None, **kw) -> "Script":
        into_ = f" into {into}" if into else ""
        return self._add(f"merge {', '.join(models)}{into_} using {self._call(using, kw)}")

    def merge_adapters(self, in_: str | None = None) -> "Script":
        return self._add("merge adapters" + (f" in {self._sel(in_)}" if in_ else ""))

    def lower(self, *ops: str, to: str = "triton", in_: str | None = None) -> "Script":
        return self._add(f"lower {', '.join(ops)} to {to}" + (f" in {self._sel(in_)}" if in_ else ""))

    def expect(self, condition: str) -> "Script":
        return self._add(f"expect {condition}")

    def export(self, fmt: str, path: str, **kw) -> "Script":
        head = self._call(fmt, kw) if kw else fmt
        return self._add(f"export {head} {self._value(path)}")

    def save(self, path: str) -> "Script":
        return self._add(f"save {self._value(path)}")

    # outputs
    def program(self) -> ast.Program:
        return parse(self.to_text())

    def to_text(self) -> str:
        return to_text(parse("\n".join(self._stmts) + "\n"))

    def compile(self):
        from surgery.api import Program

        return Program(self.to_text())
