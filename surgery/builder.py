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

from surgery import ast, verbs
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

    def statement(self, verb: str, *head: str, **kw) -> "Script":
        """Any statement of the verb table: ``head`` fills the operands, keywords named after a
        preposition (``to``, ``in_``, ``for_``, ``with_``, ``into``, ``using``) fill clauses, and
        the remaining keywords are the method's parameters."""
        spec = verbs.form_for(verb, head[0] if head else None)
        method_at = spec.method_part()
        params = {k: v for k, v in kw.items() if k.rstrip("_") not in (*spec.clauses, "using")}
        words = [verb]
        if spec.head is not None and head:
            words.append(self._part(spec.head, head, params if method_at and method_at[0] == "" else {}))
        if spec.head_then_path:
            words.append(self._value(head[1]))
        for prep, part in spec.clauses.items():
            value = kw.get(prep, kw.get(prep + "_"))
            if value is not None:
                mine = params if method_at and method_at[0] == prep else {}
                words.append(f"{prep} {self._part(part, value, mine)}")
        using = kw.get("using")
        if spec.using is not None and spec.using.slot is verbs.Slot.OPTIONS and params:
            using = next(kw.get(p, kw.get(p + "_")) for p, part in spec.clauses.items()
                         if part.slot is verbs.Slot.METHOD)
        if using is not None:
            words.append(f"using {self._call(using, params)}")
        return self._add(" ".join(words))

    def _part(self, part: verbs.Part, value, params: dict[str, Any]) -> str:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if part.slot is verbs.Slot.SELECTOR:
            return self._sel(items[0])
        if part.slot is verbs.Slot.METHOD:
            return self._call(items[0], params) if params else str(items[0])
        if part.slot is verbs.Slot.PATH:
            return self._value(items[0])
        if part.slot is verbs.Slot.COUNT:  # for_=200 -> `200 steps`
            return f"{int(items[0])} {'step' if int(items[0]) == 1 else 'steps'}"
        return ", ".join(str(x) for x in items)

    def __getattr__(self, verb: str):
        """Verbs added to the table later (plugins) get a builder method too."""
        if verb.startswith("_") or verb not in verbs.verb_names():
            raise AttributeError(verb)
        return lambda *head, **kw: self.statement(verb, *head, **kw)

    def quantize(self, selector: str, *, to: str, using: str | None = None, **kw) -> "Script":
        return self.statement("quantize", selector, to=to, using=using, **kw)

    def prune(self, selector: str, *, to: str, using: str | None = None, **kw) -> "Script":
        return self.statement("prune", selector, to=to, using=using, **kw)

    def adapt(self, selector: str, *, with_: str, **kw) -> "Script":
        return self.statement("adapt", selector, with_=with_, **kw)

    def swap(self, op: str, *, in_: str, for_: str, **kw) -> "Script":
        return self.statement("swap", op, in_=in_, for_=for_, **kw)

    def merge(self, *models: str, using: str, into: str | None = None, **kw) -> "Script":
        return self.statement("merge", *models, into=into, using=using, **kw)

    def merge_adapters(self, in_: str | None = None) -> "Script":
        return self.statement("merge", "adapters", in_=in_)

    def lower(self, *ops: str, to: str = "triton", in_: str | None = None, **kw) -> "Script":
        return self.statement("lower", *ops, to=to, in_=in_, **kw)

    def train(self, what: str, *, on: str, for_: int, using: str = "lm", **kw) -> "Script":
        """``what`` is "adapters" or a selector; ``for_`` counts optimizer steps."""
        return self.statement("train", what, on=on, for_=for_, using=using, **kw)

    def expect(self, condition: str) -> "Script":
        return self._add(f"expect {condition}")

    def export(self, fmt: str, path: str, **kw) -> "Script":
        return self.statement("export", fmt, path, **kw)

    def save(self, path: str) -> "Script":
        return self.statement("save", path)

    # outputs
    def program(self) -> ast.ScriptNode:
        return parse(self.to_text())

    def to_text(self) -> str:
        return to_text(parse("\n".join(self._stmts) + "\n"))

    def compile(self):
        from surgery.api import Program

        return Program(self.to_text())
