"""Compiler-style diagnostics: code, message, file:line:col, source line, caret span, help.

Every user mistake becomes a :class:`Diagnostic`; a batch of them is raised as one
:class:`SurgeryError`. The CLI renders them as text or JSON and exits with code 2.
"""

from __future__ import annotations

import difflib
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
    code: str
    message: str
    span: Span | None = None
    help: str | None = None
    labels: list[Label] = field(default_factory=list)
    severity: str = "error"
    source: SourceFile | None = None  # filled in by the compiler before rendering

    def to_json(self) -> dict:
        def loc(span: Span | None) -> dict | None:
            if span is None:
                return None
            return {"line": span.line, "column": span.col, "end_line": span.end_line,
                    "end_column": span.end_col}

        return {
            "code": self.code,
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

    def with_source(self, source: SourceFile) -> "SurgeryError":
        for d in self.diagnostics:
            if d.source is None:
                d.source = source
        return SurgeryError(self.diagnostics)

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


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


# The catalogue of diagnostic codes. docs/language.md documents each with an example; a test
# checks that every code raised somewhere is listed here.
CODES: dict[str, str] = {
    # syntax
    "E0100": "syntax error",
    "E0101": "unknown statement keyword",
    "E0102": "unterminated string",
    "E0103": "unsupported language version",
    # names and declarations
    "E0200": "undefined name",
    "E0201": "unknown method",
    "E0202": "name declared twice",
    "E0203": "no registered pass for this verb",
    "E0204": "unknown selector function",
    "E0205": "no subject model",
    "E0206": "unknown data source",
    "E0207": "wrong kind of value",
    "E0208": "missing clause",
    "E0209": "unexpected clause",
    "E0210": "unknown metric",
    # parameters
    "E0300": "unknown parameter",
    "E0301": "invalid parameter value",
    "E0302": "missing required parameter",
    "E0303": "invalid sparsity or format",
    # selectors and binding
    "E0400": "selector matches nothing",
    "E0401": "selected module cannot take this pass",
    "E0402": "shape or divisibility error",
    "E0403": "invalid glob or regular expression",
    # state order
    "E0500": "illegal order of passes",
    # models and files
    "E0600": "model cannot be loaded",
    "E0601": "pickle file refused",
    "E0602": "file not found",
    "E0603": "corrupt checkpoint",
    "E0604": "models are incompatible",
    # data
    "E0700": "data cannot be loaded",
    # run and expectations
    "E0800": "expectation failed",
    "E0801": "pass failed",
    "E0802": "output path problem",
    "E0803": "backend unavailable",
}
