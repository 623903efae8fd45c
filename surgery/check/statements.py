"""Transforming and output statements, checked generically from the verb table.

For each statement: pick the verb's form (surgery/verbs.py), check its clauses, read every part
(selector, word, models, method, path ...) with the rule of its slot, resolve the pass, and
validate the method's keyword arguments together with the statement-filled fields through the
pass's ``Params``. No verb has code of its own here.
"""

from __future__ import annotations

from surgery import ast, registry, verbs
from surgery.check import params as param_check
from surgery.check.parts import Reading, read_part
from surgery.check.program import Checking, Step
from surgery.check.values import to_value
from surgery.diagnostics import Code, Label, did_you_mean
from surgery.passapi import ORIGINAL
from surgery.selectors import Everything, StateSel
from surgery.source import Span
from surgery.verbs import VerbSpec

def check_statement(cx: Checking, stmt: ast.VerbStmt) -> None:
    first = stmt.operands[0].id if stmt.operands and isinstance(stmt.operands[0], ast.Name) else None
    spec = verbs.form_for(stmt.verb, first)
    if not _clauses_ok(cx, stmt, spec):
        return
    read = Reading()
    operands = stmt.operands
    if spec.tail is not None:  # VERB FORMAT "PATH": the grammar guarantees the two operands
        read_part(cx, stmt, spec, spec.head, operands[:1], stmt.verb_span, read)
        read_part(cx, stmt, spec, spec.tail, operands[1:], stmt.verb_span, read)
    elif spec.head is None and operands:
        cx.add(Code.E0207, f"`{stmt.verb}` takes no operand before its clauses", operands[0].span,
               help=verbs.usage(stmt.verb))
        return
    elif spec.head is not None:
        read_part(cx, stmt, spec, spec.head, operands, stmt.verb_span, read)
    for prep, part in spec.clauses.items():
        clause = stmt.clause(prep)
        if clause is not None:
            read_part(cx, stmt, spec, part, clause.operands, clause.span, read)
    if stmt.using is not None:
        read_part(cx, stmt, spec, spec.using, [stmt.using], stmt.using.span, read)
    if not read.ok:
        return
    cls, method_span = _resolve_pass(cx, stmt, spec, read)
    if cls is None:
        return
    if read.selector is None and spec.default_selector == "everything":
        read.selector = Everything(stmt.span)
    elif read.selector is None and spec.default_selector is not None:  # e.g. `train adapters`
        read.selector = StateSel(stmt.span, spec.default_selector)
    params = _params(cx, stmt, spec, cls, read)
    if params is not None:
        cx.out.steps.append(Step(stmt, stmt.verb, cls.method, cls, params, read.selector,
                                 method_span))


def _clauses_ok(cx: Checking, stmt: ast.VerbStmt, spec: VerbSpec) -> bool:
    ok, seen = True, set()
    for cl in stmt.clauses:
        if cl.prep not in spec.clauses:
            cx.add(Code.E0209, f"`{stmt.verb}` takes no `{cl.prep}` clause", cl.span,
                   help=verbs.usage(stmt.verb))
            ok = False
        elif cl.prep in seen:
            cx.add(Code.E0202, f"`{cl.prep}` given twice", cl.span)
            ok = False
        seen.add(cl.prep)
    for prep, part in spec.clauses.items():
        if part.required and prep not in seen:
            cx.add(Code.E0208, f"`{stmt.verb}` needs a `{prep}` clause", stmt.verb_span,
                   help=verbs.usage(stmt.verb))
            ok = False
    if stmt.using is not None and spec.using is None:
        where = spec.method_part()
        said = f"names its method with `{where[0]}`, not `using`" if where and where[0] else \
            "takes no `using` clause"
        cx.add(Code.E0209, f"`{stmt.verb}` {said}", stmt.using.span, help=verbs.usage(stmt.verb))
        ok = False
    if stmt.using is None and spec.using is not None and spec.using.required:
        methods = [m for m in registry.methods_for(stmt.verb)
                   if m not in {f.method for f in verbs.forms(stmt.verb)}]
        cx.add(Code.E0208, f"`{stmt.verb}` needs a method", stmt.verb_span,
               help="add `using METHOD(...)`; registered methods: " + ", ".join(methods))
        ok = False
    return ok


def _resolve_pass(cx: Checking, stmt: ast.VerbStmt, spec: VerbSpec, read: Reading):
    """The pass class and the span that names it (None after reporting a problem)."""
    if spec.method is not None:
        name, span = spec.method, stmt.operands[0].span
    elif read.method is not None:
        name, span = read.method.func, read.method.func_span
    else:
        name, span = None, stmt.verb_span
    if read.options is not None and name is not None and read.options.func != name:
        cx.add(Code.E0209, f"options of `{stmt.verb} ... {name}` are given as `using {name}(...)`",
               read.options.func_span, help=f"write `using {name}(...)`")
        return None, span
    if name is None:
        cls = registry.default_pass(stmt.verb)
        if cls is None:
            _no_method(cx, stmt, span)
        return cls, span
    cls = registry.get_pass(stmt.verb, name)
    if cls is None:
        methods = registry.methods_for(stmt.verb)
        if not methods:
            _no_method(cx, stmt, span)
        else:
            cx.add(Code.E0201, f"unknown method `{name}` for `{stmt.verb}`", span,
                   help=did_you_mean(name, methods, listing="registered methods"))
    return cls, span


def _no_method(cx: Checking, stmt: ast.VerbStmt, span: Span) -> None:
    methods = registry.methods_for(stmt.verb)
    if methods:
        cx.add(Code.E0208, f"`{stmt.verb}` needs a method", span,
               help=f"add `using METHOD(...)`; registered methods: {', '.join(methods)}")
        return
    verbs_with_passes = sorted({p.verb for p in registry.all_passes()})
    cx.add(Code.E0203, f"no pass is registered for `{stmt.verb}` yet", stmt.verb_span,
           help=f"verbs with registered passes: {', '.join(verbs_with_passes)}; third-party "
                "passes register through the `surgery.passes` entry-point group")


def _params(cx: Checking, stmt: ast.VerbStmt, spec: VerbSpec, cls, read: Reading):
    declared = frozenset(cls.statement_fields)
    if declared != spec.fields:  # a bug in the pass, not in the script
        raise TypeError(f"pass {cls.verb}/{cls.method} declares statement_fields "
                        f"{sorted(declared)}, but the `{stmt.verb}` verb fills {sorted(spec.fields)}")
    values = {k: v for k, (v, _) in read.values.items()}
    spans = {k: s for k, (_, s) in read.values.items()}
    known = cls.Params.model_fields
    ok = True
    for call in (read.method, read.options):
        if call is None:
            continue
        if call.args:
            cx.add(Code.E0213, f"`{call.func}(...)` takes key=value arguments", call.args[0].span,
                   help=f"parameters: {', '.join(k for k in known if k not in declared) or 'none'}")
            ok = False
        for kw in call.kwargs:
            if kw.name in declared:
                cx.add(Code.E0300, f"`{kw.name}` is set by the statement, not as a parameter",
                       kw.span, help=verbs.usage(stmt.verb))
                ok = False
            elif kw.name not in known:
                user = [k for k in known if k not in declared]
                cx.add(Code.E0300, f"`{call.func}` has no parameter `{kw.name}`", kw.span,
                       help=did_you_mean(kw.name, user, listing="parameters")
                       or f"`{call.func}` takes no parameters")
                ok = False
            elif kw.name in values and kw.name not in spans:
                cx.add(Code.E0304, f"parameter `{kw.name}` given twice", kw.span)
                ok = False
            else:
                values[kw.name] = to_value(kw.value)
                spans[kw.name] = kw.span
                _check_nested_data(cx, kw)
    if not ok:
        return None
    data_fields = cls.data_fields()
    for name in data_fields:
        ref = values.get(name)
        if isinstance(ref, str) and ref not in cx.out.data:
            cx.add(Code.E0200, f"undefined data `{ref}`", spans.get(name, stmt.span),
                   help=did_you_mean(ref, cx.out.data)
                   or 'declare it with `data NAME = corpus("pydoc", samples=64, seqlen=256)`')
            return None
    for name in cls.model_fields_named():
        ref = values.get(name)
        if isinstance(ref, str) and ref != ORIGINAL and ref not in cx.out.models:
            cx.add(Code.E0342, f"`{name}={ref}` is neither a declared model nor `{ORIGINAL}`",
                   spans.get(name, stmt.span),
                   help=did_you_mean(ref, [ORIGINAL, *cx.out.models], listing="models")
                   or f'use `{ORIGINAL}` (the model before surgery) or declare it with '
                      f'`model {ref} = "hf:DIR"`')
            return None
    anchor = read.method.span if read.method is not None and read.method.kwargs else stmt.span
    codes = {f: Code.E0303 for f in spec.fields if f in ("format", "sparsity")}
    params = param_check.validate(cx, cls.Params, cls.method, values, spans, anchor, codes)
    if params is not None:  # checks against the declarations (`train`: data vs batch size)
        for problem in cls.check_declarations(params, cx.out):
            cx.add(problem.code, problem.message, spans.get(problem.field, stmt.span),
                   help=problem.hint)
            params = None
    return params


def _check_nested_data(cx: Checking, kw: ast.Keyword) -> None:
    """Nested calls such as init=eva(data=calib) also name data."""
    if not isinstance(kw.value, ast.Call):
        return
    for inner in kw.value.kwargs:
        if inner.name == "data" and isinstance(inner.value, ast.Name) \
                and inner.value.id not in cx.out.data:
            cx.add(Code.E0200, f"undefined data `{inner.value.id}`", inner.value.span,
                   help=did_you_mean(inner.value.id, cx.out.data)
                   or 'declare it with `data NAME = corpus("pydoc")`')
        _check_nested_data(cx, inner)


def check_output_order(cx: Checking) -> None:
    """Outputs are written after every transformation, so they must come last; one `save`."""
    first_output = first_save = None
    for stmt in cx.out.ast.statements:
        if not isinstance(stmt, ast.VerbStmt):
            continue
        if stmt.verb == "save":
            if first_save is not None:
                cx.add(Code.E0202, "the script saves twice", stmt.span,
                       labels=[Label(first_save.span, "first save here")],
                       help="one `save` per script; use `export` for other formats")
            first_save = first_save or stmt
        if stmt.verb in ("export", "save"):
            first_output = first_output or stmt
        elif first_output is not None:
            cx.add(Code.E0209, f"`{stmt.verb}` after an output statement", stmt.verb_span,
                   labels=[Label(first_output.span, "output declared here")],
                   help="outputs are written once every step and expectation has passed; move "
                        "`save`/`export` to the end")
