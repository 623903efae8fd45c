"""Building AST nodes, shared by the lark transformer (surgery/parser.py) and the fast statement
parser (surgery/fastparse.py), so both make identical nodes: string values, chains of `|`/`&`
(rebalanced when long) and unvalidated construction of nodes whose fields are known to be right."""

from __future__ import annotations

import ast as pyast
import warnings

from surgery import ast
from surgery.source import Span

_BALANCE_AT = 16  # rebalance `|`/`&` chains with more operands than this (short ones stay as written)


def _new(cls, **fields):
    """An AST node without pydantic validation: every field is given, of the right type, by the
    code below (the lark path builds the same nodes validated; tests compare the two)."""
    obj = object.__new__(cls)
    values = {}
    for name, default in _DEFAULTS[cls].items():  # in declaration order, as pydantic keeps them
        values[name] = fields[name] if name in fields else (
            list(default) if isinstance(default, list) else default)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(fields))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


_DEFAULTS = {cls: {name: (None if f.is_required() else f.default)
                   for name, f in cls.model_fields.items()}
             for cls in (ast.Name, ast.String, ast.Number, ast.Bool, ast.Ratio, ast.Percent, ast.Count,
                     ast.ListExpr, ast.Keyword, ast.Call, ast.BinOp, ast.Neg, ast.VersionStmt, ast.ModelStmt,
                     ast.DataStmt, ast.LetStmt, ast.ExpectStmt, ast.Clause, ast.VerbStmt)}


class _Chain:
    """A left-deep chain of one associative selector operator (`|` or `&`) while the tree is
    transformed. Short chains keep their left-deep BinOp as written; long ones are rebalanced before
    any other rule sees them (so later stages recurse log2(n) deep, not n)."""

    __slots__ = ("op", "operands", "node")

    def __init__(self, op: str, operands: list, node):
        self.op, self.operands, self.node = op, operands, node


def _balanced(op: str, items: list, lo: int, hi: int):
    if hi - lo == 1:
        return items[lo]
    mid = lo + (hi - lo) // 2
    left, right = _balanced(op, items, lo, mid), _balanced(op, items, mid, hi)
    return _binop(op, left, right, Span.cover(left.span, right.span))


def chain_binop(left, op: str, right, span: Span):
    """A BinOp, or for `|`/`&` a _Chain (shared by the lark transformer and surgery/fastparse.py).
    Only the left operand continues a chain: a right operand of the same operator was
    parenthesised, and stays a unit as written."""
    if op in "|&":
        chained = isinstance(left, _Chain) and left.op == op
        ops = left.operands if chained else [_finish(left)]
        right = _finish(right)
        ops.append(right)
        node = _binop(op, left.node if chained else ops[0], right, span)
        return _Chain(op, ops, node)
    return _binop(op, _finish(left), _finish(right), span)


def _binop(op: str, left, right, span: Span):
    # Unvalidated: the operands are AST nodes and op is a grammar token (hot in long scripts).
    return _new(ast.BinOp, op=op, left=left, right=right, span=span)


def string_value(token: str):
    """The value of a STRING token (Python escapes; an unknown escape such as "\\:" stays)."""
    if "\\" not in token and "\r" not in token:  # nothing to unescape: skip the Python compiler
        return token[1:-1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pyast.literal_eval(token)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return token[1:-1]


def _finish(x):
    if not isinstance(x, _Chain):
        return x
    if len(x.operands) <= _BALANCE_AT:
        return x.node
    return _balanced(x.op, x.operands, 0, len(x.operands))
