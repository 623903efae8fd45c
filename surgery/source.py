"""Source text and spans (1-based lines and columns; end column exclusive)."""

from __future__ import annotations

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
    def __init__(self, text: str, name: str = "<script>"):
        self.text = text
        self.name = name
        self.lines = text.splitlines() or [""]

    def line_text(self, line: int) -> str:
        if 1 <= line <= len(self.lines):
            return self.lines[line - 1]
        return ""

    def span_at(self, start: int, end: int) -> Span:
        """Span for character offsets [start, end)."""
        def pos(off: int) -> tuple[int, int]:
            line = self.text.count("\n", 0, off) + 1
            col = off - (self.text.rfind("\n", 0, off) + 1) + 1
            return line, col

        l1, c1 = pos(start)
        l2, c2 = pos(end)
        return Span(line=l1, col=c1, end_line=l2, end_col=c2, start=start, end=end)
