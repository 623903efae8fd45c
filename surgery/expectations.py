"""Evaluating `expect` bounds after the run (the checker only checks their shape)."""

from __future__ import annotations

from surgery import ast


def evaluate_bound(expr: ast.Expr, original: float | None) -> float:
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.Name):
        return float(original)
    if isinstance(expr, ast.Neg):
        return -evaluate_bound(expr.operand, original)
    a, b = evaluate_bound(expr.left, original), evaluate_bound(expr.right, original)
    if expr.op == "+":
        return a + b
    if expr.op == "-":
        return a - b
    if expr.op == "*":
        return a * b
    return a / b if b else float("inf")
