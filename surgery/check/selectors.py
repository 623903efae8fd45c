"""Selector expressions -> Selector objects (surgery/selectors.py does the matching)."""

from __future__ import annotations

from surgery import ast
from surgery.check.program import Checking
from surgery.check.values import describe
from surgery.diagnostics import Code, did_you_mean
from surgery.selectors import Glob, Regex, Selector, SetOp, TypeSel, validate_regex

SELECTOR_FUNCS = ("modules", "re", "type")
SELECTOR_HELP = 'selectors: modules("glob"), re("regex"), type(Name), combined with | & -'


def selector(cx: Checking, expr: ast.Expr) -> Selector | None:
    """The selector ``expr`` denotes, or None after reporting why it is not one."""
    if isinstance(expr, ast.Name):
        if expr.id in cx.out.lets:
            return cx.out.lets[expr.id]
        kind = cx.declared.get(expr.id, (None,))[0]
        if kind:
            cx.add(Code.E0211, f"`{expr.id}` is {kind}, not a selector", expr.span,
                   help=SELECTOR_HELP)
        else:
            cx.add(Code.E0200, f"undefined selector `{expr.id}`", expr.span,
                   help=did_you_mean(expr.id, list(cx.out.lets) + list(SELECTOR_FUNCS))
                   or "declare it with `let NAME = modules(\"...\")`")
        return None
    if isinstance(expr, ast.BinOp) and expr.op in ("|", "&", "-"):
        left, right = selector(cx, expr.left), selector(cx, expr.right)
        if left is None or right is None:
            return None
        return SetOp(expr.span, expr.op, left, right)
    if isinstance(expr, ast.Call):
        return _call(cx, expr)
    if isinstance(expr, ast.String):
        cx.add(Code.E0211, "a selector is written modules(\"glob\"), re(\"regex\") or type(Name)",
               expr.span, help=f'did you mean `modules("{expr.value}")`?')
        return None
    cx.add(Code.E0211, f"expected a selector, got {describe(expr)}", expr.span, help=SELECTOR_HELP)
    return None


def _call(cx: Checking, call: ast.Call) -> Selector | None:
    if call.func not in SELECTOR_FUNCS:
        cx.add(Code.E0204, f"unknown selector function `{call.func}`", call.func_span,
               help=did_you_mean(call.func, SELECTOR_FUNCS, listing="selector functions"))
        return None
    allow_empty = False
    for kw in call.kwargs:
        if kw.name != "allow_empty" or not isinstance(kw.value, ast.Bool):
            cx.add(Code.E0300, f"{call.func}(...) takes only `allow_empty=true|false`", kw.span)
            return None
        allow_empty = kw.value.value
    if not call.args:
        cx.add(Code.E0212, f"{call.func}(...) needs an argument", call.span)
        return None
    if call.func == "modules":
        return _glob(cx, call, allow_empty)
    if len(call.args) != 1:
        cx.add(Code.E0212, f"{call.func}(...) takes exactly one argument", call.span)
        return None
    arg = call.args[0]
    if call.func == "re":
        if not isinstance(arg, ast.String):
            cx.add(Code.E0211, "re(...) takes a regular expression string", arg.span)
            return None
        problem = validate_regex(arg.value)
        if problem:
            cx.add(Code.E0403, f"invalid regular expression: {problem}", arg.span)
            return None
        return Regex(call.span, arg.value, allow_empty)
    if not isinstance(arg, ast.Name):
        cx.add(Code.E0211, "type(...) takes a class name such as Linear", arg.span,
               help="write type(Linear), not type(\"Linear\")")
        return None
    return TypeSel(call.span, arg.id, allow_empty)


def _glob(cx: Checking, call: ast.Call, allow_empty: bool) -> Selector | None:
    bad = [a for a in call.args if not isinstance(a, ast.String)]
    if bad:
        cx.add(Code.E0211, "modules(...) takes glob strings", bad[0].span,
               help='e.g. modules("model.layers.*.mlp.*_proj")')
        return None
    for a in call.args:
        if not a.value or ".." in a.value or a.value.startswith(".") or a.value.endswith("."):
            cx.add(Code.E0403, f"`{a.value}` is not a valid module glob", a.span,
                   help="globs are dotted paths such as `model.layers.*.mlp`")
            return None
    return Glob(call.span, tuple(a.value for a in call.args), tuple(a.span for a in call.args),
                allow_empty)
