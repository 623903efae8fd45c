"""Declarations: `surgery N`, `model`, `data` and `let`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from surgery import ast
from surgery.check import params as param_check
from surgery.check.program import LANGUAGE_VERSION, Checking, DataDecl, ModelDecl
from surgery.check.selectors import selector
from surgery.check.values import describe, to_value
from surgery.diagnostics import Code, did_you_mean

DATA_SOURCES = ("corpus", "text")
MODEL_SCHEMES = ("zoo:", "hf:", "gguf:")
_LIMIT = 1_000_000  # samples, windows and seqlen beyond this are mistakes, not data sets


class DataParams(BaseModel):
    """Keyword arguments of corpus(...) and text(...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    samples: int = Field(64, ge=1, le=_LIMIT, strict=True)
    seqlen: int = Field(256, ge=2, le=_LIMIT, strict=True)
    seed: int = Field(0, ge=0, le=2**63 - 1, strict=True)
    eval_windows: int | None = Field(None, ge=1, le=_LIMIT, strict=True)


def version(cx: Checking, stmt: ast.VersionStmt) -> None:
    if stmt.version != LANGUAGE_VERSION:
        cx.add(Code.E0103, f"this compiler speaks `surgery {LANGUAGE_VERSION}`, the script asks "
               f"for version {stmt.version}", stmt.span,
               help=f"write `surgery {LANGUAGE_VERSION}` or remove the line")
    cx.out.version = stmt.version


def model(cx: Checking, stmt: ast.ModelStmt) -> None:
    if not isinstance(stmt.source, ast.String):
        cx.add(Code.E0211, f"a model source is a string, got {describe(stmt.source)}",
               stmt.source.span, help='write model NAME = "zoo:smollm2-135m" or "hf:DIR"')
        return
    src = stmt.source.value
    if not src.startswith(MODEL_SCHEMES):
        cx.add(Code.E0600, f"unknown model source `{src}`", stmt.source.span,
               help="use `zoo:NAME` (built-in offline models: minilm-l6, smollm2-135m), `hf:DIR`, "
                    "`hf:FILE.safetensors`, `hf:ORG/NAME` (local Hugging Face cache) or "
                    "`gguf:FILE.gguf`")
        return
    if src.startswith("zoo:"):
        from surgery.models import ZOO

        if src[4:] not in ZOO:
            cx.add(Code.E0600, f"no zoo model named `{src[4:]}`", stmt.source.span,
                   help=did_you_mean(src[4:], ZOO, listing="zoo models"))
            return
    if cx.declare(stmt.name, "a model", stmt.name_span):
        cx.out.models[stmt.name] = ModelDecl(stmt.name, src, stmt.span)


def data(cx: Checking, stmt: ast.DataStmt) -> None:
    src = stmt.source
    if not isinstance(src, ast.Call) or src.func not in DATA_SOURCES:
        if isinstance(src, ast.Call):
            cx.add(Code.E0206, f"unknown data source `{src.func}`", src.func_span,
                   help=did_you_mean(src.func, DATA_SOURCES, listing="data sources"))
        else:
            cx.add(Code.E0206, "data is declared with corpus(...) or text(...)", src.span,
                   help=f"data sources: {', '.join(DATA_SOURCES)}")
        return
    what = "corpus name" if src.func == "corpus" else "file path"
    example = f'{src.func}("{"pydoc" if src.func == "corpus" else "notes.txt"}", samples=64, seqlen=256)'
    if len(src.args) != 1:
        cx.add(Code.E0212, f"{src.func}(...) takes the {what} as its one positional argument",
               src.span, help=f"e.g. {example}")
        return
    if not isinstance(src.args[0], ast.String):
        cx.add(Code.E0211, f"the {what} is a string, got {describe(src.args[0])}",
               src.args[0].span, help=f"e.g. {example}")
        return
    name = src.args[0].value
    ok = True
    if src.func == "corpus":
        from surgery.data import CORPORA

        if name not in CORPORA:
            cx.add(Code.E0206, f"no built-in corpus named `{name}`", src.args[0].span,
                   help=did_you_mean(name, CORPORA, listing="built-in corpora"))
            ok = False
    values = {kw.name: to_value(kw.value) for kw in src.kwargs}
    spans = {kw.name: kw.value.span for kw in src.kwargs}
    for kw in src.kwargs:
        if kw.name not in DataParams.model_fields:
            cx.add(Code.E0300, f"{src.func}(...) has no parameter `{kw.name}`", kw.span,
                   help=did_you_mean(kw.name, DataParams.model_fields, listing="parameters"))
            values.pop(kw.name)
            ok = False
    p = param_check.validate(cx, DataParams, src.func, values, spans, src.span)
    if p is not None and ok and cx.declare(stmt.name, "data", stmt.name_span):
        cx.out.data[stmt.name] = DataDecl(stmt.name, src.func, name, p.samples, p.seqlen, p.seed,
                                          stmt.span, p.eval_windows)


def let(cx: Checking, stmt: ast.LetStmt) -> None:
    sel = selector(cx, stmt.value)
    if sel is not None and cx.declare(stmt.name, "a selector", stmt.name_span):
        cx.out.lets[stmt.name] = sel
