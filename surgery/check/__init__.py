"""Static checking: AST -> CheckedProgram (names resolved, methods found, parameters validated).

Nothing here looks at a model. Every independent error is collected and reported together. One
module per job: declarations, selectors, statements (generic, from the verb table), params
(pydantic -> diagnostics), expect.
"""

from __future__ import annotations

from surgery import ast
from surgery.check import declarations, expect, statements
from surgery.check.program import (LANGUAGE_VERSION, CheckedProgram, Checking, DataDecl,
                                   Expectation, ModelDecl, Step)
from surgery.check.values import ValueProblem
from surgery.diagnostics import SurgeryError
from surgery.source import SourceFile

__all__ = ["LANGUAGE_VERSION", "CheckedProgram", "DataDecl", "Expectation", "ModelDecl", "Step",
           "check"]

_BY_KIND = {
    "version": declarations.version,
    "model": declarations.model,
    "data": declarations.data,
    "let": declarations.let,
    "expect": expect.expect,
    "verb": statements.check_statement,
}


def check(program: ast.ScriptNode, source: SourceFile) -> CheckedProgram:
    cx = Checking(program, source)
    for stmt in program.statements:
        try:
            _BY_KIND[stmt.kind](cx, stmt)
        except ValueProblem as e:
            cx.diagnostics.append(e.diag)
    statements.check_output_order(cx)
    if cx.diagnostics:
        diags = sorted(cx.diagnostics, key=lambda d: d.span.start if d.span else 0)
        raise SurgeryError(diags).with_source(source)
    return cx.out
