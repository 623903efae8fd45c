"""Reading a statement's parts by slot (surgery/verbs.py): a selector, a word, declared model
names, a method call, a path ... Each reader reports what is wrong and returns MISSING."""

from __future__ import annotations

from typing import Any

from surgery import ast, verbs
from surgery.check.program import Checking
from surgery.check.selectors import selector as read_selector
from surgery.check.values import describe, to_value
from surgery.diagnostics import Code, did_you_mean
from surgery.source import Span
from surgery.verbs import Part, Slot, VerbSpec

MISSING = object()  # a part that failed to read (already reported)


class Reading:
    """What a statement's parts said: the selector, the method call, field values."""

    def __init__(self):
        self.selector = None
        self.method: ast.Call | None = None
        self.options: ast.Call | None = None
        self.values: dict[str, tuple[Any, Span]] = {}
        self.ok = True


def read_part(cx: Checking, stmt: ast.VerbStmt, spec: VerbSpec, part: Part,
               operands: list[ast.Expr], anchor: Span, read: Reading) -> None:
    if not operands:
        cx.add(Code.E0207, f"`{stmt.verb}` needs {part.what}", anchor, help=verbs.usage(stmt.verb))
        read.ok = False
        return
    if part.slot not in (Slot.WORDS, Slot.MODELS) and len(operands) != 1:
        hint = "combine selectors with `|`, not `,`" if part.slot is Slot.SELECTOR else \
            verbs.usage(stmt.verb)
        cx.add(Code.E0212, f"`{stmt.verb}` takes one {part.slot.value} here", operands[1].span,
               help=hint)
        read.ok = False
        return
    value = _READERS[part.slot](cx, stmt, part, operands)
    if value is MISSING:
        read.ok = False
    elif part.slot is Slot.SELECTOR:
        read.selector = value
    elif part.slot is Slot.METHOD:
        read.method = value
    elif part.slot is Slot.OPTIONS:
        read.options = value
    elif part.field is not None:
        read.values[part.field] = (value, Span.cover(operands[0].span, operands[-1].span))


def _wrong(cx: Checking, part: Part, expr: ast.Expr, stmt: ast.VerbStmt):
    cx.add(Code.E0303 if part.field in ("format", "sparsity") else Code.E0211,
           f"`{stmt.verb}` expects {part.what} here, got {describe(expr)}", expr.span,
           help=verbs.usage(stmt.verb))
    return MISSING


def _selector(cx, stmt, part, ops):
    sel = read_selector(cx, ops[0])
    return MISSING if sel is None else sel


def _word(cx, stmt, part, ops):
    return ops[0].id if isinstance(ops[0], ast.Name) else _wrong(cx, part, ops[0], stmt)


def _words(cx, stmt, part, ops):
    bad = next((o for o in ops if not isinstance(o, ast.Name)), None)
    return [o.id for o in ops] if bad is None else _wrong(cx, part, bad, stmt)


def _pattern(cx, stmt, part, ops):
    if isinstance(ops[0], (ast.Ratio, ast.Percent)):
        return to_value(ops[0])
    return _wrong(cx, part, ops[0], stmt)


def _model_names(cx, stmt, part, ops):
    names = []
    for o in ops:
        if not isinstance(o, ast.Name):
            return _wrong(cx, part, o, stmt)
        if o.id not in cx.out.models:
            cx.add(Code.E0200, f"undefined model `{o.id}`", o.span,
                   help=did_you_mean(o.id, cx.out.models, listing="models")
                   or 'declare it with `model NAME = "hf:DIR"`')
            return MISSING
        names.append(o.id)
    return names


def _model(cx, stmt, part, ops):
    names = _model_names(cx, stmt, part, ops)
    return names if names is MISSING else names[0]


def _method(cx, stmt, part, ops):
    expr = ops[0]
    if isinstance(expr, ast.Name):
        return ast.Call(func=expr.id, func_span=expr.span, span=expr.span)
    if isinstance(expr, ast.Call):
        return expr
    return _wrong(cx, part, expr, stmt)


def _path(cx, stmt, part, ops):
    return ops[0].value if isinstance(ops[0], ast.String) else _wrong(cx, part, ops[0], stmt)


def _literal(cx, stmt, part, ops):
    return part.word


def _value(cx, stmt, part, ops):
    return to_value(ops[0])


def _count(cx, stmt, part, ops):
    return ops[0].value if isinstance(ops[0], ast.Count) else _wrong(cx, part, ops[0], stmt)


_READERS = {Slot.SELECTOR: _selector, Slot.WORD: _word, Slot.WORDS: _words,
            Slot.PATTERN: _pattern, Slot.MODELS: _model_names, Slot.MODEL: _model,
            Slot.METHOD: _method, Slot.OPTIONS: _method, Slot.PATH: _path,
            Slot.LITERAL: _literal, Slot.VALUE: _value,
            Slot.COUNT: _count}


