"""Compiler-style diagnostics: code, message, file:line:col, source line, caret span, help.

Every user mistake becomes a :class:`Diagnostic`; a batch of them is raised as one
:class:`SurgeryError`. The CLI renders them as text or JSON and exits with code 2.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from surgery.source import SourceFile, Span


@dataclass
class Label:
    """A secondary location with its own short message (e.g. 'quantized to int4 here')."""

    span: Span
    message: str


@dataclass
class Diagnostic:
    code: Code  # a plain "E0500" string is accepted and checked against the catalogue
    message: str
    span: Span | None = None
    help: str | None = None
    labels: list[Label] = field(default_factory=list)
    severity: str = "error"
    source: SourceFile | None = None  # filled in by the compiler before rendering

    def __post_init__(self):
        self.code = Code(self.code)  # an uncatalogued code is a bug: fail where it is raised

    def to_json(self) -> dict:
        def loc(span: Span | None) -> dict | None:
            if span is None:
                return None
            return {"line": span.line, "column": span.col, "end_line": span.end_line,
                    "end_column": span.end_col}

        return {
            "code": self.code.value,
            "severity": self.severity,
            "message": self.message,
            "file": self.source.name if self.source else None,
            "location": loc(self.span),
            "help": self.help,
            "labels": [{"message": lb.message, "location": loc(lb.span)} for lb in self.labels],
        }

    def render(self) -> str:
        """Render like a compiler:

        error[E0201]: unknown method `gtpq` for `quantize`
         --> script.surg:3:29
          |
        3 | quantize body to int4 using gtpq(group=64)
          |                             ^^^^
          = help: did you mean `gptq`?
        """
        head = f"{self.severity}[{self.code}]: {self.message}"
        src = self.source
        if self.span is None or src is None:
            out = [head]
            if src is not None:
                out.append(f" --> {src.name}")
            if self.help:
                out.append(f"  = help: {self.help}")
            return "\n".join(out)
        spans = [(self.span, "")] + [(lb.span, lb.message) for lb in self.labels]
        width = len(str(max(s.end_line for s, _ in spans)))
        pad = " " * width
        out = [head, f"{pad}--> {src.name}:{self.span.line}:{self.span.col}", f"{pad} |"]
        for i, (span, msg) in enumerate(sorted(spans, key=lambda t: (t[0].line, t[0].col))):
            text = src.line_text(span.line)
            out.append(f"{span.line:>{width}} | {text}")
            end_col = span.end_col if span.end_line == span.line else len(text) + 1
            n = max(1, end_col - span.col)
            mark = ("^" if span == self.span else "-") * n
            caret = " " * (span.col - 1) + mark + (f" {msg}" if msg else "")
            out.append(f"{pad} | {caret}".rstrip())
        if self.help:
            out.append(f"{pad} = help: {self.help}")
        return "\n".join(out)


class SurgeryError(Exception):
    """One or more user errors. ``str(err)`` is the rendered report."""

    def __init__(self, diagnostics: Diagnostic | Sequence[Diagnostic]):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        parts = [d.render() for d in self.diagnostics]
        n = len(self.diagnostics)
        if n > 1:
            parts.append(f"error: aborting due to {n} previous errors")
        return "\n\n".join(parts)

    def with_source(self, source: SourceFile, span: Span | None = None) -> "SurgeryError":
        """The same error with ``source`` (and ``span`` where a diagnostic has none) filled in."""
        for d in self.diagnostics:
            d.source = d.source or source
            d.span = d.span or span
        return SurgeryError(self.diagnostics)

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


def attach_source(err: SurgeryError, source: SourceFile, span: Span | None = None) -> SurgeryError:
    """Give every diagnostic of ``err`` a source file (and a default span): one helper for every
    stage that re-raises an error from a lower layer at the statement that caused it."""
    return err.with_source(source, span)


def error(code: str, message: str, span: Span | None = None, *, help: str | None = None,
          labels: Iterable[Label] = ()) -> SurgeryError:
    return SurgeryError(Diagnostic(code, message, span, help=help, labels=list(labels)))


def suggest(word: str, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """Nearest candidates by edit similarity (for did-you-mean)."""
    return difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=cutoff)


def did_you_mean(word: str, candidates: Iterable[str], *, listing: str | None = None) -> str | None:
    """A help line: 'did you mean `x`?' and/or the list of valid choices."""
    cands = sorted(set(candidates))
    close = suggest(word, cands)
    parts = []
    if close:
        parts.append(f"did you mean `{close[0]}`?")
    if listing is not None and cands:
        parts.append(f"{listing}: {', '.join(cands)}")
    return " ".join(parts) or None


# The catalogue of diagnostic codes: one meaning per code, a short title here and a long
# explanation in docs/errors/EXXXX.md (`surgery explain EXXXX`). A test checks that every code
# raised anywhere is in this enum and has its explanation.
class Code(str, enum.Enum):
    # syntax
    E0100 = "E0100"
    E0101 = "E0101"
    E0102 = "E0102"
    E0103 = "E0103"
    E0104 = "E0104"
    E0105 = "E0105"
    E0106 = "E0106"
    # names, declarations and statement shapes
    E0200 = "E0200"
    E0201 = "E0201"
    E0202 = "E0202"
    E0203 = "E0203"
    E0204 = "E0204"
    E0205 = "E0205"
    E0206 = "E0206"
    E0207 = "E0207"
    E0208 = "E0208"
    E0209 = "E0209"
    E0210 = "E0210"
    E0211 = "E0211"
    E0212 = "E0212"
    E0213 = "E0213"
    E0214 = "E0214"
    # parameters
    E0300 = "E0300"
    E0301 = "E0301"
    E0302 = "E0302"
    E0303 = "E0303"
    E0304 = "E0304"
    # budgets (EvoPress, drop)
    E0330 = "E0330"
    E0331 = "E0331"
    # selectors and binding
    E0400 = "E0400"
    E0401 = "E0401"
    E0402 = "E0402"
    E0403 = "E0403"
    E0404 = "E0404"
    # state order
    E0340 = "E0340"
    E0341 = "E0341"
    E0342 = "E0342"
    E0343 = "E0343"

    E0500 = "E0500"
    # models and files
    E0600 = "E0600"
    E0601 = "E0601"
    E0602 = "E0602"
    E0603 = "E0603"
    E0604 = "E0604"
    E0605 = "E0605"
    E0606 = "E0606"
    # data
    E0700 = "E0700"
    # run, expectations and outputs
    E0800 = "E0800"
    E0801 = "E0801"
    E0802 = "E0802"
    E0803 = "E0803"
    E0804 = "E0804"
    E0805 = "E0805"
    # deployable outputs (export gguf, export onnx with a KV cache)
    E0810 = "E0810"
    E0811 = "E0811"
    E0812 = "E0812"
    E0813 = "E0813"
    # resources: memory budgets, devices, what can stream (surgery/executor)
    E0900 = "E0900"
    E0901 = "E0901"
    E0902 = "E0902"
    E0903 = "E0903"
    # distributed calibration (surgery.distributed)
    E0910 = "E0910"
    E0911 = "E0911"
    # calibration activations spilled to disk (passes/calib/spill.py)
    E0912 = "E0912"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def title(self) -> str:
        return TITLES[self]


TITLES: dict[Code, str] = {
    Code.E0100: "syntax error",
    Code.E0101: "unknown statement keyword",
    Code.E0102: "unterminated string",
    Code.E0103: "unsupported language version",
    Code.E0104: "expression nested too deeply",
    Code.E0105: "number out of range",
    Code.E0106: "script is not UTF-8 text",
    Code.E0200: "undefined name",
    Code.E0201: "unknown method",
    Code.E0202: "declared or given twice",
    Code.E0203: "no registered pass for this verb",
    Code.E0204: "unknown selector function",
    Code.E0205: "no subject model",
    Code.E0206: "unknown data source",
    Code.E0207: "statement does not fit its verb's form",
    Code.E0208: "missing clause",
    Code.E0209: "unexpected clause or misplaced statement",
    Code.E0210: "unknown metric",
    Code.E0211: "wrong kind of value",
    Code.E0212: "wrong number of arguments",
    Code.E0213: "positional argument where key=value is expected",
    Code.E0214: "bound cannot be evaluated",
    Code.E0300: "unknown parameter",
    Code.E0301: "invalid parameter value",
    Code.E0302: "missing required parameter",
    Code.E0303: "invalid sparsity or format",
    Code.E0304: "parameter given twice",
    Code.E0330: "infeasible compression budget",
    Code.E0331: "dropping more blocks than selected",
    Code.E0400: "selector matches nothing",
    Code.E0401: "selected module cannot take this pass",
    Code.E0402: "shape or divisibility error",
    Code.E0403: "invalid or unsafe glob or regular expression",
    Code.E0404: "regular expression too slow to match",
    Code.E0340: "nothing to train",
    Code.E0341: "training data smaller than one batch",
    Code.E0342: "teacher is not a declared model",
    Code.E0343: "training checkpoint belongs to another run",
    Code.E0500: "illegal order of passes",
    Code.E0600: "model cannot be loaded",
    Code.E0601: "pickle file refused",
    Code.E0602: "file not found",
    Code.E0603: "corrupt checkpoint",
    Code.E0604: "models are incompatible",
    Code.E0605: "model needs remote code",
    Code.E0606: "unknown model type or architecture",
    Code.E0700: "data cannot be loaded",
    Code.E0800: "expectation failed",
    Code.E0801: "pass failed",
    Code.E0802: "output path problem",
    Code.E0803: "backend unavailable",
    Code.E0804: "output locked by another run",
    Code.E0805: "not enough disk space for the output",
    Code.E0810: "the export format cannot represent a module of the model",
    Code.E0811: "architecture not supported by this export",
    Code.E0812: "tokenizer cannot be written to GGUF",
    Code.E0813: "model cannot be exported with a KV cache",
    Code.E0900: "memory budget below one block",
    Code.E0901: "device unavailable",
    Code.E0902: "step cannot be streamed",
    Code.E0903: "expectation not evaluated in a streamed run",
    Code.E0910: "a process of a distributed run failed",
    Code.E0911: "cannot start or join a distributed run",
    Code.E0912: "cannot spill calibration activations to disk",
}

# Kept for callers that want code -> title as plain strings.
CODES: dict[str, str] = {c.value: t for c, t in TITLES.items()}


def explanation(code: str) -> str | None:
    """The long explanation of ``code`` (docs/errors/CODE.md, shipped as surgery.errordocs)."""
    from importlib import resources

    try:
        return resources.files("surgery.errordocs").joinpath(f"{Code(code.upper())}.md").read_text()
    except (ValueError, FileNotFoundError, ModuleNotFoundError):
        return None
