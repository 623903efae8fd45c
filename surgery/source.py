"""Source text and spans (1-based lines and columns; end column exclusive)."""

from __future__ import annotations

from bisect import bisect_right

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    model_config = ConfigDict(frozen=True)

    line: int
    col: int
    end_line: int
    end_col: int
    start: int = 0  # character offsets into the source
    end: int = 0

    @staticmethod
    def cover(a: "Span", b: "Span") -> "Span":
        first, last = (a, b) if a.start <= b.start else (b, a)
        return Span(line=first.line, col=first.col, end_line=last.end_line, end_col=last.end_col,
                    start=first.start, end=last.end)


class SourceFile:
    """Script text with a line index, so a span costs O(log lines) rather than a scan from the
    start of the file (which made checking quadratic in script length)."""

    def __init__(self, text: str, name: str = "<script>"):
        self.text = text
        self.name = name
        # Lines are split on "\n" only, the same rule spans use (str.splitlines would also split on
        # \x0b, \x1c, \u2028 ..., and the rendered line would not be the one the span names).
        self.lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
        if text.endswith("\n"):
            self.lines.pop()
        self.lines = self.lines or [""]
        starts, at = [0], text.find("\n")
        while at != -1:
            starts.append(at + 1)
            at = text.find("\n", at + 1)
        self._line_starts = starts

    def line_text(self, line: int) -> str:
        if 1 <= line <= len(self.lines):
            return self.lines[line - 1]
        return ""

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        i = bisect_right(self._line_starts, offset) - 1
        return i + 1, offset - self._line_starts[i] + 1

    def span_at(self, start: int, end: int) -> Span:
        """Span for character offsets [start, end)."""
        l1, c1 = self.position(start)
        l2, c2 = self.position(end)
        return _span(l1, c1, l2, c2, start, end)


_SPAN_FIELDS = frozenset(Span.model_fields)


def _span(line: int, col: int, end_line: int, end_col: int, start: int, end: int) -> Span:
    """A Span without pydantic validation (the values are ints computed above): spans are made
    for every token of every statement, and validation was a third of parsing time. The result
    is indistinguishable from ``Span(...)`` (tests/test_fastparse.py compares dumps)."""
    obj = object.__new__(Span)
    object.__setattr__(obj, "__dict__", {"line": line, "col": col, "end_line": end_line,
                                         "end_col": end_col, "start": start, "end": end})
    object.__setattr__(obj, "__pydantic_fields_set__", set(_SPAN_FIELDS))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj
