"""`expect` at run time: measuring the metrics before and after, evaluating bounds.

A bound is an expression of numbers and `original` (the metric on the input model). It is
evaluated lazily, operator by operator, so a division by zero is a diagnostic pointing at the
divisor; a divisor without `original` is checked already when the plan is made
(:func:`literal_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from surgery import ast, evaluate
from surgery.check import CheckedProgram, Expectation
from surgery.data import Dataset
from surgery.diagnostics import Diagnostic, SurgeryError

AGREEMENT_WINDOWS = 4  # evaluation windows used by max_abs_diff / cosine

_COMPARE = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
            ">": lambda a, b: a > b, "==": lambda a, b: a == b}
_ARITH = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class _ZeroDivisor(Exception):
    def __init__(self, expr: ast.Expr):
        self.expr = expr


def _value(expr: ast.Expr, original: float | None) -> float | None:
    """The bound's value; None when it needs `original` and none is given."""
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.Name):  # the checker allows only `original`
        return None if original is None else float(original)
    if isinstance(expr, ast.Neg):
        v = _value(expr.operand, original)
        return None if v is None else -v
    a, b = _value(expr.left, original), _value(expr.right, original)
    if expr.op == "/" and b == 0:
        raise _ZeroDivisor(expr.right)
    if a is None or b is None:
        return None
    return a / b if expr.op == "/" else _ARITH[expr.op](a, b)


def _zero_divisor(program: CheckedProgram, exp: Expectation, divisor: ast.Expr,
                  original: float | None) -> Diagnostic:
    when = f" (original = {original:.6g})" if original is not None else ""
    return Diagnostic("E0214", f"the bound of this expectation divides by zero{when}",
                      divisor.span, help="divide by a number that is not zero",
                      source=program.source)


def evaluate_bound(program: CheckedProgram, exp: Expectation, original: float | None) -> float:
    try:
        return _value(exp.bound, original)
    except _ZeroDivisor as z:
        raise SurgeryError(_zero_divisor(program, exp, z.expr, original)) from None


def literal_problems(program: CheckedProgram) -> list[Diagnostic]:
    """Divisions by a literal zero (no `original` involved), found before anything runs."""
    out = []
    for exp in program.expectations:
        try:
            _value(exp.bound, None)
        except _ZeroDivisor as z:
            out.append(_zero_divisor(program, exp, z.expr, None))
    return out


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


def measure_before(exp: Expectation, model: nn.Module, data: dict[str, Dataset]):
    ds = data[exp.data]
    if exp.metric == "perplexity":
        return evaluate.perplexity(model, ds.evaluation)
    return evaluate.outputs(model, ds.evaluation[:AGREEMENT_WINDOWS])


def _measure_after(exp: Expectation, model: nn.Module, data, before) -> tuple[float, float | None]:
    ds = data[exp.data]
    if exp.metric == "perplexity":
        return evaluate.perplexity(model, ds.evaluation), before
    after = evaluate.outputs(model, ds.evaluation[:AGREEMENT_WINDOWS])
    fn = evaluate.max_abs_diff if exp.metric == "max_abs_diff" else evaluate.cosine
    return fn(after, before), None


def check(program: CheckedProgram, model: nn.Module, data: dict[str, Dataset],
          before: dict[int, Any], progress) -> list[ExpectationRecord]:
    """Measure every expectation on ``model``; raise E0800 (all failures together) if any fails."""
    measured = {}
    for exp in program.expectations:
        with progress.task(f"checking expectation at line {exp.line}"):
            measured[exp.line] = _measure_after(exp, model, data, before[exp.line])
    return judge(program, measured)


def judge(program: CheckedProgram,
          measured: dict[int, tuple[float, float | None]]) -> list[ExpectationRecord]:
    """The records of every expectation from its measured (value, original), by line; raise
    E0800 (all failures together) if any fails. The in-memory runner and the streamed executor
    (surgery/executor/evaluate.py) both end here."""
    records, failed = [], []
    for exp in program.expectations:
        value, original = measured[exp.line]
        bound = evaluate_bound(program, exp, original)
        ok = _COMPARE[exp.op](value, bound)
        span = exp.stmt.span
        text = " ".join(program.source.text[span.start:span.end].split())
        records.append(ExpectationRecord(exp.line, text, value, bound, original, ok))
        if not ok:
            orig = f" (original {original:.4g})" if original is not None else ""
            failed.append(Diagnostic(
                "E0800", f"expectation failed: {exp.metric}({exp.data}) = {value:.6g}, "
                         f"bound {exp.op} {bound:.6g}{orig}", span,
                help="no artifact was written; relax the bound or change the recipe",
                source=program.source))
    if failed:
        raise SurgeryError(failed)
    return records
