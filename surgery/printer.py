"""AST -> canonical .surg text (one statement per line)."""

from __future__ import annotations

import json

from surgery import ast, verbs

_PREC = {"|": 1, "&": 2, "+": 3, "-": 3, "*": 4, "/": 4}


def expr_text(e: ast.Expr, parent: int = 0) -> str:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.String):
        return json.dumps(e.value)
    if isinstance(e, ast.Number):
        return e.text
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Ratio):
        return f"{e.n}:{e.m}"
    if isinstance(e, ast.Percent):
        return f"{e.text}%"
    if isinstance(e, ast.Count):
        return f"{e.text} {'step' if e.value == 1 else 'steps'}"
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(expr_text(x) for x in e.items) + "]"
    if isinstance(e, ast.Call):
        parts = [expr_text(a) for a in e.args] + [f"{k.name}={expr_text(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(parts)})"
    if isinstance(e, ast.Neg):
        return "-" + expr_text(e.operand, 5)
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        text = f"{expr_text(e.left, p)} {e.op} {expr_text(e.right, p + 1)}"
        return f"({text})" if p < parent else text
    raise TypeError(f"cannot print {type(e).__name__}")


def stmt_text(s: ast.Stmt) -> str:
    if isinstance(s, ast.VersionStmt):
        return f"surgery {s.version}"
    if isinstance(s, ast.ModelStmt):
        return f"model {s.name} = {expr_text(s.source)}"
    if isinstance(s, ast.DataStmt):
        return f"data {s.name} = {expr_text(s.source)}"
    if isinstance(s, ast.LetStmt):
        return f"let {s.name} = {expr_text(s.value)}"
    if isinstance(s, ast.ExpectStmt):
        return f"expect {expr_text(s.left)} {s.op} {expr_text(s.right)}"
    if isinstance(s, ast.VerbStmt):
        if any(form.head_then_path for form in verbs.forms(s.verb)):  # export onnx "x.onnx"
            return f"{s.verb} {expr_text(s.operands[0])} {expr_text(s.operands[1])}"
        parts = [s.verb]
        if s.operands:
            parts.append(", ".join(expr_text(o) for o in s.operands))
        for c in s.clauses:
            parts.append(f"{c.prep} " + ", ".join(expr_text(o) for o in c.operands))
        if s.using is not None:
            parts.append(f"using {expr_text(s.using)}")
        return " ".join(parts)
    raise TypeError(f"cannot print {type(s).__name__}")


def to_text(program: ast.ScriptNode) -> str:
    return "".join(stmt_text(s) + "\n" for s in program.statements)
