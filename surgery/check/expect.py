"""`expect METRIC(DATA) OP BOUND`: the metric, its data and the bound's shape. The bound is
evaluated after the run (surgery/expectations.py); here it is only checked to be computable."""

from __future__ import annotations

from surgery import ast
from surgery.check.program import Checking, Expectation
from surgery.check.values import describe
from surgery.diagnostics import Code, did_you_mean

METRICS = ("perplexity", "max_abs_diff", "cosine")


def expect(cx: Checking, stmt: ast.ExpectStmt) -> None:
    left = stmt.left
    if not isinstance(left, ast.Call) or left.func not in METRICS:
        if isinstance(left, ast.Call):
            cx.add(Code.E0210, f"unknown metric `{left.func}`", left.func_span,
                   help=did_you_mean(left.func, METRICS, listing="metrics"))
        else:
            cx.add(Code.E0210, "`expect` starts with a metric such as perplexity(DATA)",
                   left.span, help=f"metrics: {', '.join(METRICS)}")
        return
    if len(left.args) != 1 or left.kwargs:
        cx.add(Code.E0212, f"{left.func}(...) takes one data name", left.span,
               help=f"e.g. {left.func}(calib)")
        return
    arg = left.args[0]
    if not isinstance(arg, ast.Name):
        cx.add(Code.E0211, f"{left.func}(...) takes a data name, got {describe(arg)}", arg.span,
               help=f"e.g. {left.func}(calib)")
        return
    if arg.id not in cx.out.data:
        cx.add(Code.E0200, f"undefined data `{arg.id}`", arg.span,
               help=did_you_mean(arg.id, cx.out.data) or 'declare it with `data NAME = corpus("pydoc")`')
        return
    if _bound_ok(cx, stmt.right, left.func):
        cx.out.expectations.append(Expectation(stmt, left.func, arg.id, stmt.op, stmt.right))


def _bound_ok(cx: Checking, expr: ast.Expr, metric: str) -> bool:
    if isinstance(expr, ast.Number):
        return True
    if isinstance(expr, ast.Name):
        if expr.id != "original":
            cx.add(Code.E0200, f"undefined name `{expr.id}` in expectation", expr.span,
                   help="a bound is a number or an expression of numbers and `original`")
            return False
        if metric != "perplexity":
            cx.add(Code.E0211, f"`original` is not defined for {metric} (it already compares "
                   "with the original model)", expr.span,
                   help=f"compare with a number, e.g. {metric}(calib) "
                        f"{'>= 0.99' if metric == 'cosine' else '<= 1e-2'}")
            return False
        return True
    if isinstance(expr, ast.BinOp) and expr.op in "+-*/":
        ok = _bound_ok(cx, expr.left, metric) and _bound_ok(cx, expr.right, metric)
        if ok and expr.op == "/" and _is_zero(expr.right):
            cx.add(Code.E0214, "the bound divides by zero", expr.right.span,
                   help="a bound must evaluate to a number")
            return False
        return ok
    if isinstance(expr, ast.Neg):
        return _bound_ok(cx, expr.operand, metric)
    cx.add(Code.E0211, f"a bound is a number or an expression with `original`, got "
           f"{describe(expr)}", expr.span)
    return False


def _is_zero(expr: ast.Expr) -> bool:
    """Is ``expr`` a constant expression (no `original`) equal to zero?"""
    def value(e):
        if isinstance(e, ast.Number):
            return e.value
        if isinstance(e, ast.Neg):
            v = value(e.operand)
            return None if v is None else -v
        if isinstance(e, ast.BinOp) and e.op in "+-*/":
            a, b = value(e.left), value(e.right)
            if a is None or b is None or (e.op == "/" and b == 0):
                return None
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0}[e.op]
        return None

    return value(expr) == 0
