"""Static checking: AST -> CheckedProgram (names resolved, methods found, parameters validated).

Nothing here looks at a model. Every independent error is collected and reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from surgery import ast
from surgery import registry
from surgery.diagnostics import Diagnostic, Label, SurgeryError, did_you_mean
from surgery.passapi import CallValue, NM, Pass, Percent
from surgery.selectors import Everything, Glob, Regex, Selector, SetOp, TypeSel, validate_regex
from surgery.source import SourceFile, Span

LANGUAGE_VERSION = 1
SELECTOR_FUNCS = ("modules", "re", "type")
METRICS = ("perplexity", "max_abs_diff", "cosine")
DATA_SOURCES = ("corpus", "text")


@dataclass
class ModelDecl:
    name: str
    source: str
    span: Span


@dataclass
class DataDecl:
    name: str
    kind: str  # corpus | text
    source: str  # corpus name or file path
    samples: int
    seqlen: int
    seed: int
    span: Span
    eval_windows: int | None = None


@dataclass
class Step:
    """One transforming or output statement bound to its pass."""

    stmt: ast.VerbStmt
    verb: str
    method: str
    pass_cls: type[Pass]
    params: Any
    selector: Selector | None  # module target (None for model-level passes)
    method_span: Span

    @property
    def line(self) -> int:
        return self.stmt.span.line

    @property
    def is_output(self) -> bool:
        return self.verb in ("export", "save")


@dataclass
class Expectation:
    stmt: ast.ExpectStmt
    metric: str
    data: str
    op: str
    bound: ast.Expr  # numbers and `original`

    @property
    def line(self) -> int:
        return self.stmt.span.line


@dataclass
class CheckedProgram:
    source: SourceFile
    ast: ast.Program
    version: int = LANGUAGE_VERSION
    models: dict[str, ModelDecl] = field(default_factory=dict)
    data: dict[str, DataDecl] = field(default_factory=dict)
    lets: dict[str, Selector] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    expectations: list[Expectation] = field(default_factory=list)
    save_path: str | None = None
    save_span: Span | None = None

    @property
    def subject(self) -> ModelDecl | None:
        return next(iter(self.models.values()), None)


class _Collector:
    def __init__(self):
        self.diags: list[Diagnostic] = []

    def add(self, code, message, span, help=None, labels=()):
        self.diags.append(Diagnostic(code, message, span, help=help, labels=list(labels)))


# ---------------------------------------------------------------------------- values

class _ValueError(Exception):
    def __init__(self, diag: Diagnostic):
        self.diag = diag


def to_value(expr: ast.Expr) -> Any:
    """AST value -> Python value for pass parameters."""
    if isinstance(expr, ast.Number):
        return int(expr.value) if expr.is_int else expr.value
    if isinstance(expr, (ast.String,)):
        return expr.value
    if isinstance(expr, ast.Bool):
        return expr.value
    if isinstance(expr, ast.Ratio):
        return NM(n=expr.n, m=expr.m)
    if isinstance(expr, ast.Percent):
        return Percent(value=expr.value)
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.ListExpr):
        return [to_value(x) for x in expr.items]
    if isinstance(expr, ast.Call):
        if expr.args:
            raise _ValueError(Diagnostic("E0207", f"`{expr.func}(...)` takes only key=value "
                                         "arguments here", expr.args[0].span,
                                         help=f"write {expr.func}(name=value, ...)"))
        return CallValue(name=expr.func, kwargs={k.name: to_value(k.value) for k in expr.kwargs})
    if isinstance(expr, ast.Neg):
        v = to_value(expr.operand)
        if isinstance(v, (int, float)):
            return -v
    if isinstance(expr, ast.BinOp) and expr.op in "+-*/":
        a, b = to_value(expr.left), to_value(expr.right)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else float("inf")}[expr.op]
    raise _ValueError(Diagnostic("E0207", "this expression is not a parameter value", expr.span,
                                 help="values are numbers, strings, true/false, N:M, P%, names, "
                                      "lists and method calls"))


def describe(expr: ast.Expr) -> str:
    return {"name": "a name", "string": "a string", "number": "a number", "bool": "a boolean",
            "ratio": "an N:M pattern", "percent": "a percentage", "list": "a list",
            "call": "a call", "binop": "an expression", "neg": "a number"}[expr.kind]


# ---------------------------------------------------------------------------- checker

class Checker:
    def __init__(self, program: ast.Program, source: SourceFile):
        self.program = program
        self.out = CheckedProgram(source=source, ast=program)
        self.c = _Collector()
        self.declared: dict[str, tuple[str, Span]] = {}  # name -> (kind, span)

    def run(self) -> CheckedProgram:
        for stmt in self.program.statements:
            try:
                getattr(self, f"_{stmt.kind}")(stmt)
            except _ValueError as e:
                self.c.diags.append(e.diag)
        self._check_output_order()
        if self.c.diags:
            for d in self.c.diags:
                d.source = self.out.source
            raise SurgeryError(sorted(self.c.diags, key=lambda d: d.span.start if d.span else 0))
        return self.out

    # declarations
    def _declare(self, name: str, kind: str, span: Span) -> bool:
        if name in self.declared:
            prev_kind, prev = self.declared[name]
            self.c.add("E0202", f"`{name}` is already declared (as {prev_kind})", span,
                       help="give each model, data set and selector its own name",
                       labels=[Label(prev, "first declared here")])
            return False
        self.declared[name] = (kind, span)
        return True

    def _version(self, stmt: ast.VersionStmt):
        if stmt.version != LANGUAGE_VERSION:
            self.c.add("E0103", f"this compiler speaks `surgery {LANGUAGE_VERSION}`, the script "
                       f"asks for version {stmt.version}", stmt.span,
                       help=f"write `surgery {LANGUAGE_VERSION}` or remove the line")
        self.out.version = stmt.version

    def _model(self, stmt: ast.ModelStmt):
        if not isinstance(stmt.source, ast.String):
            self.c.add("E0207", f"a model source is a string, got {describe(stmt.source)}",
                       stmt.source.span, help='write model NAME = "zoo:smollm2-135m" or "hf:DIR"')
            return
        src = stmt.source.value
        if not (src.startswith("zoo:") or src.startswith("hf:")):
            self.c.add("E0600", f"unknown model source `{src}`", stmt.source.span,
                       help="use `zoo:NAME` (built-in offline models: minilm-l6, smollm2-135m) "
                            "or `hf:DIR`")
            return
        if src.startswith("zoo:"):
            from surgery.models import ZOO

            name = src[4:]
            if name not in ZOO:
                self.c.add("E0600", f"no zoo model named `{name}`", stmt.source.span,
                           help=did_you_mean(name, ZOO, listing="zoo models"))
                return
        if self._declare(stmt.name, "a model", stmt.name_span):
            self.out.models[stmt.name] = ModelDecl(stmt.name, src, stmt.span)

    def _data(self, stmt: ast.DataStmt):
        src = stmt.source
        if not self._known_call(src, DATA_SOURCES, "E0206", "data source", "data sources",
                                "data is declared with corpus(...) or text(...)"):
            return
        if len(src.args) != 1 or not isinstance(src.args[0], ast.String):
            self.c.add("E0207", f"{src.func}(...) takes the {'corpus name' if src.func == 'corpus' else 'file path'} "
                       "as its first argument, a string", src.span,
                       help=f'e.g. {src.func}("{"pydoc" if src.func == "corpus" else "notes.txt"}", samples=64, seqlen=256)')
            return
        allowed = {"samples": 64, "seqlen": 256, "seed": 0, "eval_windows": None}
        values = dict(allowed)
        ok = True
        for kw in src.kwargs:
            if kw.name not in allowed:
                self.c.add("E0300", f"{src.func}(...) has no parameter `{kw.name}`", kw.span,
                           help=did_you_mean(kw.name, allowed, listing="parameters"))
                ok = False
                continue
            v = to_value(kw.value)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if kw.name == "seed" else 1):
                self.c.add("E0301", f"`{kw.name}` must be a whole number"
                           f"{' >= 0' if kw.name == 'seed' else ' >= 1'}", kw.value.span)
                ok = False
                continue
            values[kw.name] = v
        if src.func == "corpus":
            from surgery.data import CORPORA

            if src.args[0].value not in CORPORA:
                self.c.add("E0206", f"no built-in corpus named `{src.args[0].value}`",
                           src.args[0].span, help=did_you_mean(src.args[0].value, CORPORA,
                                                               listing="built-in corpora"))
                ok = False
        if values["seqlen"] is not None and values["seqlen"] < 2:
            self.c.add("E0301", "`seqlen` must be at least 2", src.span)
            ok = False
        if ok and self._declare(stmt.name, "data", stmt.name_span):
            self.out.data[stmt.name] = DataDecl(stmt.name, src.func, src.args[0].value,
                                                values["samples"], values["seqlen"],
                                                values["seed"], stmt.span, values["eval_windows"])

    def _known_call(self, expr: ast.Expr, names, code: str, what: str, listing: str,
                    otherwise: str) -> bool:
        """Is ``expr`` a call of one of ``names``? Reports the problem if not."""
        if isinstance(expr, ast.Call) and expr.func in names:
            return True
        if isinstance(expr, ast.Call):
            self.c.add(code, f"unknown {what} `{expr.func}`", expr.func_span,
                       help=did_you_mean(expr.func, names, listing=listing))
        else:
            self.c.add(code, otherwise, expr.span,
                       help=f"{listing}: {', '.join(sorted(names))}")
        return False

    def _let(self, stmt: ast.LetStmt):
        sel = self.selector(stmt.value)
        if sel is not None and self._declare(stmt.name, "a selector", stmt.name_span):
            self.out.lets[stmt.name] = sel

    # selectors
    def selector(self, expr: ast.Expr) -> Selector | None:
        if isinstance(expr, ast.Name):
            if expr.id in self.out.lets:
                return self.out.lets[expr.id]
            kind = self.declared.get(expr.id, (None,))[0]
            if kind:
                self.c.add("E0207", f"`{expr.id}` is {kind}, not a selector", expr.span)
            else:
                self.c.add("E0200", f"undefined selector `{expr.id}`", expr.span,
                           help=did_you_mean(expr.id, list(self.out.lets) + list(SELECTOR_FUNCS))
                           or "declare it with `let NAME = modules(\"...\")`")
            return None
        if isinstance(expr, ast.BinOp) and expr.op in ("|", "&", "-"):
            left, right = self.selector(expr.left), self.selector(expr.right)
            if left is None or right is None:
                return None
            return SetOp(expr.span, expr.op, left, right)
        if isinstance(expr, ast.Call):
            return self._selector_call(expr)
        if isinstance(expr, ast.String):
            self.c.add("E0207", "a selector is written modules(\"glob\"), re(\"regex\") or "
                       "type(Name)", expr.span, help=f'did you mean `modules("{expr.value}")`?')
            return None
        self.c.add("E0207", f"expected a selector, got {describe(expr)}", expr.span,
                   help='selectors: modules("glob"), re("regex"), type(Name), combined with | & -')
        return None

    def _selector_call(self, call: ast.Call) -> Selector | None:
        if call.func not in SELECTOR_FUNCS:
            self.c.add("E0204", f"unknown selector function `{call.func}`", call.func_span,
                       help=did_you_mean(call.func, SELECTOR_FUNCS, listing="selector functions"))
            return None
        allow_empty = False
        for kw in call.kwargs:
            if kw.name != "allow_empty" or not isinstance(kw.value, ast.Bool):
                self.c.add("E0300", f"{call.func}(...) takes only `allow_empty=true|false`",
                           kw.span)
                return None
            allow_empty = kw.value.value
        if not call.args:
            self.c.add("E0207", f"{call.func}(...) needs an argument", call.span)
            return None
        if call.func == "modules":
            bad = [a for a in call.args if not isinstance(a, ast.String)]
            if bad:
                self.c.add("E0207", "modules(...) takes glob strings", bad[0].span,
                           help='e.g. modules("model.layers.*.mlp.*_proj")')
                return None
            for a in call.args:
                if not a.value or ".." in a.value or a.value.startswith(".") or a.value.endswith("."):
                    self.c.add("E0403", f"`{a.value}` is not a valid module glob", a.span,
                               help="globs are dotted paths such as `model.layers.*.mlp`")
                    return None
            return Glob(call.span, tuple(a.value for a in call.args),
                        tuple(a.span for a in call.args), allow_empty)
        if len(call.args) != 1:
            self.c.add("E0207", f"{call.func}(...) takes exactly one argument", call.span)
            return None
        arg = call.args[0]
        if call.func == "re":
            if not isinstance(arg, ast.String):
                self.c.add("E0207", 're(...) takes a regular expression string', arg.span)
                return None
            problem = validate_regex(arg.value)
            if problem:
                self.c.add("E0403", f"invalid regular expression: {problem}", arg.span)
                return None
            return Regex(call.span, arg.value, allow_empty)
        if not isinstance(arg, ast.Name):
            self.c.add("E0207", "type(...) takes a class name such as Linear", arg.span,
                       help="write type(Linear), not type(\"Linear\")")
            return None
        return TypeSel(call.span, arg.id, allow_empty)

    # verbs
    def _verb(self, stmt: ast.VerbStmt):
        handler = getattr(self, f"_verb_{stmt.verb}")
        handler(stmt)

    def _expect_clauses(self, stmt: ast.VerbStmt, allowed: dict[str, bool]) -> bool:
        """allowed: prep -> required. Reports unexpected and missing clauses."""
        ok = True
        seen = set()
        for cl in stmt.clauses:
            if cl.prep not in allowed:
                self.c.add("E0209", f"`{stmt.verb}` takes no `{cl.prep}` clause", cl.span,
                           help=self._verb_usage(stmt.verb))
                ok = False
            elif cl.prep in seen:
                self.c.add("E0209", f"`{cl.prep}` given twice", cl.span)
                ok = False
            seen.add(cl.prep)
        for prep, required in allowed.items():
            if required and prep not in seen:
                self.c.add("E0208", f"`{stmt.verb}` needs a `{prep}` clause", stmt.verb_span,
                           help=self._verb_usage(stmt.verb))
                ok = False
        return ok

    @staticmethod
    def _verb_usage(verb: str) -> str:
        return "usage: " + {
            "quantize": "quantize SELECTOR to int8|int4 [using METHOD(...)]",
            "prune": "prune SELECTOR to N:M|P% [using METHOD(...)]",
            "adapt": "adapt SELECTOR with METHOD(...)",
            "swap": "swap softmax in SELECTOR for METHOD(...)",
            "merge": "merge A, B [into BASE] using METHOD(...)  or  merge adapters [in SELECTOR]",
            "lower": "lower OP, ... to BACKEND [in SELECTOR]",
            "export": 'export FORMAT "PATH"',
            "save": 'save "PATH"',
        }[verb]

    def _one_selector(self, stmt: ast.VerbStmt, operands: list[ast.Expr]) -> Selector | None:
        if len(operands) != 1:
            span = operands[1].span if len(operands) > 1 else stmt.verb_span
            self.c.add("E0207", f"`{stmt.verb}` takes one selector", span,
                       help="combine selectors with `|`, not `,`" if len(operands) > 1 else
                       self._verb_usage(stmt.verb))
            return None
        return self.selector(operands[0])

    def _resolve_pass(self, stmt: ast.VerbStmt, method: str | None, span: Span):
        if method is None:
            cls = registry.default_pass(stmt.verb)
            if cls is None:
                methods = registry.methods_for(stmt.verb)
                if not methods:
                    self._no_pass(stmt)
                else:
                    self.c.add("E0208", f"`{stmt.verb}` needs a method", span,
                               help=f"add `using METHOD(...)`; registered methods: "
                                    f"{', '.join(methods)}")
                return None
            return cls
        cls = registry.get_pass(stmt.verb, method)
        if cls is None:
            methods = registry.methods_for(stmt.verb)
            if not methods:
                self._no_pass(stmt)
            else:
                self.c.add("E0201", f"unknown method `{method}` for `{stmt.verb}`", span,
                           help=did_you_mean(method, methods, listing="registered methods"))
            return None
        return cls

    def _no_pass(self, stmt: ast.VerbStmt):
        verbs = sorted({p.verb for p in registry.all_passes()})
        self.c.add("E0203", f"no pass is registered for `{stmt.verb}` yet", stmt.verb_span,
                   help=f"verbs with registered passes: {', '.join(verbs)}; third-party passes "
                        "register through the `surgery.passes` entry-point group")

    def _params(self, stmt: ast.VerbStmt, cls: type[Pass], call: ast.Call | None,
                fields: dict[str, tuple[Any, Span]]):
        """Validate method kwargs + compiler-filled fields with the pass's Params model."""
        values: dict[str, Any] = {k: v for k, (v, _) in fields.items()}
        spans: dict[str, Span] = {k: s for k, (_, s) in fields.items()}
        known = cls.Params.model_fields
        ok = True
        if call is not None:
            if call.args:
                self.c.add("E0207", f"`{call.func}(...)` takes key=value arguments",
                           call.args[0].span, help=f"parameters: {', '.join(known) or 'none'}")
                ok = False
            for kw in call.kwargs:
                if kw.name in fields:
                    self.c.add("E0300", f"`{kw.name}` is set by the statement, not as a "
                               "parameter", kw.span)
                    ok = False
                    continue
                if kw.name not in known:
                    user = [k for k in known if k not in fields]
                    self.c.add("E0300", f"`{call.func}` has no parameter `{kw.name}`", kw.span,
                               help=did_you_mean(kw.name, user, listing="parameters") or
                               f"`{call.func}` takes no parameters")
                    ok = False
                    continue
                values[kw.name] = to_value(kw.value)
                spans[kw.name] = kw.span
                self._check_data_refs(kw)
        if not ok:
            return None
        try:
            params = cls.Params.model_validate(values)
        except ValidationError as e:
            anchor = call.span if call is not None else stmt.span
            for err in e.errors():
                loc = err["loc"][0] if err["loc"] else None
                span = spans.get(loc, anchor)
                if err["type"] == "missing":
                    self.c.add("E0302", f"`{cls.method}` needs the parameter `{loc}`", anchor,
                               help=f"add {loc}=...")
                elif err["type"] == "extra_forbidden":
                    self.c.add("E0300", f"unknown parameter `{loc}`", span)
                else:
                    msg = err["msg"].removeprefix("Value error, ")
                    where = f"`{loc}`" if loc in spans and loc not in fields else "this"
                    code = "E0303" if loc in ("sparsity", "format") else "E0301"
                    self.c.add(code, f"invalid value for {where}: {msg}", span)
            return None
        for name in cls.data_fields():
            ref = getattr(params, name, None)
            if ref is not None and isinstance(ref, str) and ref not in self.out.data:
                self.c.add("E0200", f"undefined data `{ref}`", spans.get(name, stmt.span),
                           help=did_you_mean(ref, self.out.data) or
                           'declare it with `data NAME = corpus("pydoc", samples=64, seqlen=256)`')
                return None
        return params

    def _check_data_refs(self, kw: ast.Keyword):
        """Nested calls such as init=eva(data=calib) also name data."""
        if isinstance(kw.value, ast.Call):
            for inner in kw.value.kwargs:
                if inner.name == "data" and isinstance(inner.value, ast.Name) \
                        and inner.value.id not in self.out.data:
                    self.c.add("E0200", f"undefined data `{inner.value.id}`", inner.value.span,
                               help=did_you_mean(inner.value.id, self.out.data) or
                               'declare it with `data NAME = corpus("pydoc")`')
                self._check_data_refs(inner)

    def _add_step(self, stmt, cls, params, selector, method_span):
        self.out.steps.append(Step(stmt, stmt.verb, cls.method, cls, params, selector,
                                   method_span))

    def _verb_quantize(self, stmt):
        self._module_verb_to(stmt, "format", lambda e: isinstance(e, ast.Name),
                             "a format such as int8 or int4")

    def _verb_prune(self, stmt):
        self._module_verb_to(stmt, "sparsity", lambda e: isinstance(e, (ast.Ratio, ast.Percent)),
                             "N:M (e.g. 2:4) or a percentage (e.g. 50%)")

    def _module_verb_to(self, stmt, field_name, ok_value, what):
        if not self._expect_clauses(stmt, {"to": True}):
            return
        sel = self._one_selector(stmt, stmt.operands)
        to = stmt.clause("to")
        if len(to.operands) != 1 or not ok_value(to.operands[0]):
            self.c.add("E0303", f"`{stmt.verb} ... to` takes {what}", to.operands[0].span)
            return
        method = stmt.using.func if stmt.using else None
        span = stmt.using.func_span if stmt.using else stmt.verb_span
        cls = self._resolve_pass(stmt, method, span)
        if cls is None or sel is None:
            return
        params = self._params(stmt, cls, stmt.using,
                              {field_name: (to_value(to.operands[0]), to.operands[0].span)})
        if params is not None:
            self._add_step(stmt, cls, params, sel, span)

    def _verb_adapt(self, stmt):
        if not self._expect_clauses(stmt, {"with": True}):
            return
        if stmt.using is not None:
            self.c.add("E0209", "`adapt` names its method with `with`, not `using`",
                       stmt.using.span, help=self._verb_usage("adapt"))
            return
        sel = self._one_selector(stmt, stmt.operands)
        method_expr = stmt.clause("with").operands[0]
        call = self._method_call(method_expr)
        if call is None:
            return
        cls = self._resolve_pass(stmt, call.func, call.func_span)
        if cls is None or sel is None:
            return
        params = self._params(stmt, cls, call, {})
        if params is not None:
            self._add_step(stmt, cls, params, sel, call.func_span)

    def _method_call(self, expr: ast.Expr) -> ast.Call | None:
        if isinstance(expr, ast.Name):
            return ast.Call(func=expr.id, func_span=expr.span, span=expr.span)
        if isinstance(expr, ast.Call):
            return expr
        self.c.add("E0207", f"expected a method such as lora(r=8), got {describe(expr)}",
                   expr.span)
        return None

    def _verb_swap(self, stmt):
        if not self._expect_clauses(stmt, {"in": True, "for": True}):
            return
        if len(stmt.operands) != 1 or not isinstance(stmt.operands[0], ast.Name):
            span = stmt.operands[0].span if stmt.operands else stmt.verb_span
            self.c.add("E0207", "`swap` names the op to replace, e.g. `swap softmax in ...`", span)
            return
        op = stmt.operands[0]
        sel = self._one_selector(stmt, stmt.clause("in").operands)
        call = self._method_call(stmt.clause("for").operands[0])
        if call is None:
            return
        cls = self._resolve_pass(stmt, call.func, call.func_span)
        if cls is None or sel is None:
            return
        params = self._params(stmt, cls, call, {"op": (op.id, op.span)})
        if params is not None:
            self._add_step(stmt, cls, params, sel, call.func_span)

    def _verb_lower(self, stmt):
        if not self._expect_clauses(stmt, {"to": True, "in": False}):
            return
        ops = stmt.operands
        if not ops or not all(isinstance(o, ast.Name) for o in ops):
            self.c.add("E0207", "`lower` takes op names, e.g. `lower stablemax, int4_linear to "
                       "triton`", ops[0].span if ops else stmt.verb_span)
            return
        backend = stmt.clause("to").operands[0]
        if not isinstance(backend, ast.Name):
            self.c.add("E0207", "`lower ... to` takes a backend name such as triton", backend.span)
            return
        if stmt.using is not None and stmt.using.func != backend.id:
            self.c.add("E0209", f"options of `lower ... to {backend.id}` are given as "
                       f"`using {backend.id}(...)`", stmt.using.func_span,
                       help=f"write `using {backend.id}(...)`")
            return
        in_ = stmt.clause("in")
        sel = self._one_selector(stmt, in_.operands) if in_ else Everything(stmt.span)
        cls = self._resolve_pass(stmt, backend.id, backend.span)
        if cls is None or sel is None:
            return
        op_span = Span.cover(ops[0].span, ops[-1].span)
        params = self._params(stmt, cls, stmt.using, {"ops": ([o.id for o in ops], op_span)})
        if params is not None:
            self._add_step(stmt, cls, params, sel, backend.span)

    def _verb_merge(self, stmt):
        ops = stmt.operands
        if len(ops) == 1 and isinstance(ops[0], ast.Name) and ops[0].id == "adapters":
            if not self._expect_clauses(stmt, {"in": False}):
                return
            in_ = stmt.clause("in")
            sel = self._one_selector(stmt, in_.operands) if in_ else Everything(stmt.span)
            cls = self._resolve_pass(stmt, "adapters", ops[0].span)
            if cls is None or sel is None:
                return
            params = self._params(stmt, cls, stmt.using, {})
            if params is not None:
                self._add_step(stmt, cls, params, sel, ops[0].span)
            return
        if not self._expect_clauses(stmt, {"into": False}):
            return
        names = []
        for o in ops:
            if not isinstance(o, ast.Name) or o.id not in self.out.models:
                what = o.id if isinstance(o, ast.Name) else None
                self.c.add("E0200", f"undefined model `{what}`" if what else
                           "`merge` takes declared model names", o.span,
                           help=did_you_mean(what or "", self.out.models, listing="models") or
                           'declare it with `model NAME = "hf:DIR"`')
                return
            names.append(o.id)
        if not names:
            self.c.add("E0207", "`merge` needs the models to merge", stmt.verb_span,
                       help=self._verb_usage("merge"))
            return
        base = None
        into = stmt.clause("into")
        if into is not None:
            b = into.operands[0]
            if not isinstance(b, ast.Name) or b.id not in self.out.models:
                self.c.add("E0200", "`into` takes a declared model name", b.span,
                           help=did_you_mean(getattr(b, "id", ""), self.out.models,
                                             listing="models"))
                return
            base = b.id
        if stmt.using is None:
            methods = registry.methods_for("merge")
            self.c.add("E0208", "`merge` needs a method", stmt.verb_span,
                       help="add `using METHOD(...)`; registered methods: " +
                            ", ".join(m for m in methods if m != "adapters"))
            return
        cls = self._resolve_pass(stmt, stmt.using.func, stmt.using.func_span)
        if cls is None:
            return
        params = self._params(stmt, cls, stmt.using,
                              {"models": (names, Span.cover(ops[0].span, ops[-1].span)),
                               "base": (base, into.span if into else stmt.span)})
        if params is not None:
            self._add_step(stmt, cls, params, None, stmt.using.func_span)

    def _verb_export(self, stmt):
        fmt, path = stmt.operands
        call = self._method_call(fmt)
        cls = self._resolve_pass(stmt, call.func, call.func_span)
        if cls is None:
            return
        params = self._params(stmt, cls, call if call.kwargs else None,
                              {"path": (path.value, path.span)})
        if params is not None:
            self._add_step(stmt, cls, params, None, call.func_span)

    def _verb_save(self, stmt):
        if stmt.clauses or stmt.using or len(stmt.operands) != 1 or \
                not isinstance(stmt.operands[0], ast.String):
            self.c.add("E0207", 'write `save "PATH"`', stmt.span)
            return
        if self.out.save_path is not None:
            self.c.add("E0202", "the script saves twice", stmt.span,
                       labels=[Label(self.out.save_span, "first save here")],
                       help="one `save` per script; use `export` for other formats")
            return
        self.out.save_path = stmt.operands[0].value
        self.out.save_span = stmt.span
        cls = registry.default_pass("save")  # an output pass like `export` (passes/export/save.py)
        self._add_step(stmt, cls, cls.Params(path=self.out.save_path), None, stmt.verb_span)

    def _expect(self, stmt: ast.ExpectStmt):
        left = stmt.left
        if not self._known_call(left, METRICS, "E0210", "metric", "metrics",
                                "`expect` starts with a metric such as perplexity(DATA)"):
            return
        if len(left.args) != 1 or not isinstance(left.args[0], ast.Name) or left.kwargs:
            self.c.add("E0207", f"{left.func}(...) takes one data name", left.span,
                       help=f"e.g. {left.func}(calib)")
            return
        data = left.args[0].id
        if data not in self.out.data:
            self.c.add("E0200", f"undefined data `{data}`", left.args[0].span,
                       help=did_you_mean(data, self.out.data) or
                       'declare it with `data NAME = corpus("pydoc")`')
            return
        if not self._bound_ok(stmt.right, left.func):
            return
        self.out.expectations.append(Expectation(stmt, left.func, data, stmt.op, stmt.right))

    def _bound_ok(self, expr: ast.Expr, metric: str) -> bool:
        if isinstance(expr, ast.Number):
            return True
        if isinstance(expr, ast.Name):
            if expr.id == "original":
                if metric != "perplexity":
                    self.c.add("E0207", f"`original` is not defined for {metric} (it already "
                               "compares with the original model)", expr.span,
                               help=f"compare with a number, e.g. {metric}(calib) "
                                    f"{'>= 0.99' if metric == 'cosine' else '<= 1e-2'}")
                    return False
                return True
            self.c.add("E0200", f"undefined name `{expr.id}` in expectation", expr.span,
                       help="a bound is a number or an expression of numbers and `original`")
            return False
        if isinstance(expr, ast.BinOp) and expr.op in "+-*/":
            return self._bound_ok(expr.left, metric) and self._bound_ok(expr.right, metric)
        if isinstance(expr, ast.Neg):
            return self._bound_ok(expr.operand, metric)
        self.c.add("E0207", f"a bound is a number or an expression with `original`, got "
                   f"{describe(expr)}", expr.span)
        return False

    def _check_output_order(self):
        """Outputs are written after every transformation, so they must come last."""
        first_output = None
        for stmt in self.program.statements:
            if isinstance(stmt, ast.VerbStmt):
                if stmt.verb in ("export", "save"):
                    first_output = first_output or stmt
                elif first_output is not None:
                    self.c.add("E0209", f"`{stmt.verb}` after an output statement", stmt.verb_span,
                               labels=[Label(first_output.span, "output declared here")],
                               help="outputs are written once every step and expectation has "
                                    "passed; move `save`/`export` to the end")


def check(program: ast.Program, source: SourceFile) -> CheckedProgram:
    return Checker(program, source).run()

