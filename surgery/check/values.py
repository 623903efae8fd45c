"""AST values -> Python values for pass parameters."""

from __future__ import annotations

from typing import Any

from surgery import ast
from surgery.diagnostics import Code, Diagnostic
from surgery.passapi import NM, CallValue, Percent


class ValueProblem(Exception):
    """A value that cannot become a parameter; carries its diagnostic."""

    def __init__(self, diag: Diagnostic):
        self.diag = diag


def describe(expr: ast.Expr) -> str:
    """An AST value kind in English, for 'expected X, got Y' messages."""
    return {"name": "a name", "string": "a string", "number": "a number", "bool": "a boolean",
            "ratio": "an N:M pattern", "percent": "a percentage", "count": "a step count", "list": "a list",
            "call": "a call", "binop": "an expression", "neg": "a number"}[expr.kind]


def to_value(expr: ast.Expr) -> Any:
    if isinstance(expr, ast.Number):
        return int(expr.value) if expr.is_int else expr.value
    if isinstance(expr, (ast.String, ast.Bool)):
        return expr.value
    if isinstance(expr, ast.Ratio):
        return NM(n=expr.n, m=expr.m)
    if isinstance(expr, ast.Percent):
        return Percent(value=expr.value)
    if isinstance(expr, ast.Count):
        return expr.value
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.ListExpr):
        return [to_value(x) for x in expr.items]
    if isinstance(expr, ast.Call):
        if expr.args:
            raise ValueProblem(Diagnostic(Code.E0213, f"`{expr.func}(...)` takes only key=value "
                                          "arguments here", expr.args[0].span,
                                          help=f"write {expr.func}(name=value, ...)"))
        return CallValue(name=expr.func, kwargs={k.name: to_value(k.value) for k in expr.kwargs})
    if isinstance(expr, ast.Neg):
        v = to_value(expr.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v
    if isinstance(expr, ast.BinOp) and expr.op in "+-*/":
        a, b = to_value(expr.left), to_value(expr.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            if expr.op == "/" and b == 0:
                raise ValueProblem(Diagnostic(Code.E0301, "division by zero", expr.span))
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0}[expr.op]
    raise ValueProblem(Diagnostic(Code.E0211, "this expression is not a parameter value",
                                  expr.span, help="values are numbers, strings, true/false, N:M, "
                                                  "P%, names, lists and method calls"))
