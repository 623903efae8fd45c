"""Text -> AST. Splits the script into statements, parses each with the lark grammar, and reports
every syntax error at once."""

from __future__ import annotations

import contextlib
import gc
import math
import re
from importlib import resources

import lark
from lark import v_args
from lark.visitors import Transformer_NonRecursive

from surgery import ast, fastparse, verbs
from surgery.astbuild import _finish, chain_binop, string_value
from surgery.diagnostics import Code, Diagnostic, SurgeryError, did_you_mean, suggest
from surgery.source import SourceFile, Span

DECLARATION_KEYWORDS = ("surgery", "model", "data", "let", "expect")


def statement_keywords() -> tuple[str, ...]:
    """Words that start a statement: the declarations plus every verb of the verb table."""
    return DECLARATION_KEYWORDS + verbs.verb_names()

# Documented limits (docs/language.md, "Limits"). Deeper nesting is refused with E0104 rather than
# risking Python's recursion limit in later stages, which walk expressions recursively. Chains of
# `|` or `&` are flattened and rebalanced (both are associative on module sets), so a generated
# union of thousands of globs nests only log2(n) deep and never meets this limit.
MAX_EXPR_DEPTH = 100
MAX_NUMBER_DIGITS = 40  # longer numerals are refused with E0105 (int() of huge strings is slow)

# What the terminals look like, for "expected ..." messages.
_TERMINAL_TEXT = {
    "NAME": "a name", "STRING": "a string", "NUMBER": "a number", "VERB": "a verb",
    "PATH_VERB": "a verb",
    "PREP": "`to`/`in`/`for`/`with`/`into`/`of`/`on`", "USING": "`using`", "STEPS": "`steps`",
    "COMPARE": "a comparison",
    "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "COMMA": "`,`", "EQUAL": "`=`",
    "COLON": "`:`", "PERCENT": "`%`", "OR": "`|`", "AND": "`&`", "PLUS": "`+`", "MINUS": "`-`",
    "MULOP": "`*` or `/`", "TRUE": "`true`", "FALSE": "`false`", "$END": "end of statement",
}


_built: tuple[object, lark.Lark] | None = None  # (the verb table it was built from, parser)


def _lark() -> lark.Lark:
    """The parser for the current verb table (rebuilt when a verb is added)."""
    global _built
    if _built is None or _built[0] is not verbs.VERBS:
        _built = (verbs.VERBS, _build(verbs.VERBS))
    return _built[1]


def _build(table) -> lark.Lark:
    text = resources.files("surgery.grammar").joinpath("surgery.lark").read_text()

    def alternation(words) -> str:  # longest first: a verb that prefixes another cannot win
        return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))

    text = (text.replace("@VERBS@", alternation(v.verb for v in table if not v.head_then_path))
                .replace("@PATH_VERBS@", alternation(v.verb for v in table if v.head_then_path))
                .replace("@PREPS@", alternation(p for v in table for p in v.clauses)))
    return lark.Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=False)


# ---------------------------------------------------------------------------- statement split

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')


def _depth_change(line: str) -> int:
    """Bracket depth change over a line, ignoring strings and comments."""
    if '"' in line or "'" in line:
        line = _STRING.sub("", line)  # complete strings, left to right, as the loop reads them
    if '"' not in line and "'" not in line:  # the common case, in C
        line = line.split("#", 1)[0]
        return line.count("(") + line.count("[") - line.count(")") - line.count("]")
    depth, i, quote = 0, 0, None
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        i += 1
    return depth


def split_statements(src: SourceFile) -> tuple[list[tuple[int, int]], list[Diagnostic]]:
    """Character ranges of statements, plus diagnostics for lines that start no statement."""
    chunks: list[list[int]] = []
    diags: list[Diagnostic] = []
    offset, depth = 0, 0
    # "\n" ends a line, as in SourceFile; other characters str.splitlines breaks on do not.
    for raw in re.findall(r"[^\n]*\n|[^\n]+$", src.text):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        start_of_line = offset
        offset += len(raw)
        if not stripped or stripped.startswith("#"):
            continue
        continuing = depth > 0 or line[:1] in (" ", "\t")
        depth = max(0, depth + _depth_change(line))
        if continuing and chunks:
            chunks[-1][1] = start_of_line + len(line)
            continue
        m = _WORD.match(stripped)
        word = m.group(0) if m else stripped.split()[0]
        col0 = start_of_line + (len(line) - len(line.lstrip()))
        if word in statement_keywords():
            chunks.append([col0, start_of_line + len(line)])
            continue
        span = src.span_at(col0, col0 + len(word))
        diags.append(Diagnostic(
            "E0101", f"`{word}` does not start a statement", span,
            help=did_you_mean(word, statement_keywords(), listing="statements start with")))
        depth = 0
    return [(a, b) for a, b in chunks], diags


# ---------------------------------------------------------------------------- tree -> AST

class _ToAst(Transformer_NonRecursive):
    """Lark tree -> AST without recursion (lark's plain Transformer recurses once per tree level
    and overflows Python's stack on a few hundred nested operators)."""


    def __init__(self, src: SourceFile, base: int):
        super().__init__()
        self.src, self.base = src, base

    def _span(self, meta_or_tok) -> Span:
        """Tokens and tree metadata both carry start_pos/end_pos within the statement."""
        return self.src.span_at(self.base + meta_or_tok.start_pos, self.base + meta_or_tok.end_pos)

    def _call_userfunc(self, tree, new_children=None):
        children = tree.children if new_children is None else new_children
        if tree.data != "binop":
            children = [_finish(c) for c in children]
        return super()._call_userfunc(tree, children)

    def _finite(self, text: str, meta) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _AstError(Diagnostic(Code.E0105, f"number `{text}` is out of range",
                                       self._span(meta), help="the largest number is about 1.8e308"))
        return value

    def _number_text(self, tok) -> str:
        text = str(tok)
        if len(text) > MAX_NUMBER_DIGITS:
            raise _AstError(Diagnostic(
                Code.E0105, f"number with {len(text)} characters is too long", self._span(tok),
                help=f"numbers have at most {MAX_NUMBER_DIGITS} characters; use an exponent "
                     "such as 1e9"))
        return text

    # atoms
    @v_args(meta=True)
    def name(self, meta, children):
        return ast.Name(id=str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        return ast.String(value=string_value(str(children[0])), span=self._span(meta))

    @v_args(meta=True)
    def number(self, meta, children):
        text = self._number_text(children[0])
        return ast.Number(value=self._finite(text, meta), text=text, span=self._span(meta))

    @v_args(meta=True)
    def ratio(self, meta, children):
        a, b = (self._number_text(c) for c in children)
        span = self._span(meta)
        for t in (a, b):
            if not t.isdigit():
                raise _AstError(Diagnostic("E0303", f"`{a}:{b}` is not an N:M pattern", span,
                                           help="N and M are whole numbers, e.g. 2:4"))
        return ast.Ratio(n=int(a), m=int(b), span=span)

    @v_args(meta=True)
    def percent(self, meta, children):
        text = self._number_text(children[0])
        return ast.Percent(value=self._finite(text, meta), text=text, span=self._span(meta))

    @v_args(meta=True)
    def count(self, meta, children):
        text = self._number_text(children[0])
        if not text.isdigit():
            raise _AstError(Diagnostic(Code.E0211, f"`{text} steps` is not a whole number of steps",
                                       self._span(meta), help="write a whole number, e.g. `200 steps`"))
        return ast.Count(value=int(text), text=text, span=self._span(meta))

    @v_args(meta=True)
    def boolean(self, meta, children):
        return ast.Bool(value=str(children[0]) == "true", span=self._span(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListExpr(items=[c for c in children if c is not None], span=self._span(meta))

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return ast.Keyword(name=str(name), value=value, span=self._span(name))

    @v_args(meta=True)
    def call(self, meta, children):
        func = children[0]
        args, kwargs = [], []
        for c in children[1:]:
            if c is None:
                continue
            if isinstance(c, ast.Keyword):
                if any(k.name == c.name for k in kwargs):
                    raise _AstError(Diagnostic("E0304", f"parameter `{c.name}` given twice", c.span))
                kwargs.append(c)
            else:
                if kwargs:
                    raise _AstError(Diagnostic("E0100", "positional argument after a keyword "
                                               "argument", c.span,
                                               help="put positional arguments first"))
                args.append(c)
        return ast.Call(func=str(func), func_span=self._span(func), args=args, kwargs=kwargs,
                        span=self._span(meta))

    @v_args(meta=True)
    def binop(self, meta, children):
        left, op, right = children
        return chain_binop(left, str(op), right, self._span(meta))

    @v_args(meta=True)
    def neg(self, meta, children):
        operand = children[1]
        if isinstance(operand, ast.Number):
            return ast.Number(value=-operand.value, text="-" + operand.text, span=self._span(meta))
        return ast.Neg(operand=operand, span=self._span(meta))

    # statements
    @v_args(meta=True)
    def version_stmt(self, meta, children):
        tok = children[0]
        self._number_text(tok)
        if not str(tok).isdigit():
            raise _AstError(Diagnostic("E0103", f"language version must be a whole number, "
                                       f"got `{tok}`", self._span(tok), help="write `surgery 1`"))
        return ast.VersionStmt(version=int(str(tok)), span=self._span(meta))

    @v_args(meta=True)
    def model_stmt(self, meta, children):
        name, value = children
        return ast.ModelStmt(name=str(name), name_span=self._span(name), source=value,
                             span=self._span(meta))

    @v_args(meta=True)
    def data_stmt(self, meta, children):
        name, value = children
        return ast.DataStmt(name=str(name), name_span=self._span(name), source=value,
                            span=self._span(meta))

    @v_args(meta=True)
    def let_stmt(self, meta, children):
        name, value = children
        return ast.LetStmt(name=str(name), name_span=self._span(name), value=value,
                           span=self._span(meta))

    @v_args(meta=True)
    def expect_stmt(self, meta, children):
        left, op, right = children
        return ast.ExpectStmt(left=left, op=str(op), right=right, span=self._span(meta))

    def operands(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def clause(self, meta, children):
        prep, operands = children
        return ast.Clause(prep=str(prep), operands=operands, span=self._span(meta))

    @v_args(meta=True)
    def export_stmt(self, meta, children):
        verb, fmt, path = children
        return ast.VerbStmt(verb=str(verb), verb_span=self._span(verb), operands=[fmt, path],
                            span=self._span(meta))

    def using(self, children):
        return children[1]

    @v_args(meta=True)
    def verb_stmt(self, meta, children):
        verb = children[0]
        operands, clauses, using = [], [], None
        for c in children[1:]:
            if c is None:
                continue
            if isinstance(c, list):
                operands = c
            elif isinstance(c, ast.Clause):
                clauses.append(c)
            elif isinstance(c, ast.Call):
                using = c
        return ast.VerbStmt(verb=str(verb), verb_span=self._span(verb), operands=operands,
                            clauses=clauses, using=using, span=self._span(meta))


class _AstError(Exception):
    def __init__(self, diag: Diagnostic):
        self.diag = diag


def _too_deep(stmt: ast.Node) -> Diagnostic | None:
    """E0104 at the first expression nested deeper than MAX_EXPR_DEPTH (walked without recursion)."""
    stack = [(stmt, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_EXPR_DEPTH:
            return Diagnostic(Code.E0104, f"expression nested more than {MAX_EXPR_DEPTH} levels deep",
                              node.span, help="split it with `let` declarations")
        for value in node.__dict__.values():
            if isinstance(value, ast.Node):
                stack.append((value, depth + 1))
            elif isinstance(value, list):
                stack.extend((v, depth + 1) for v in value if isinstance(v, ast.Node))
    return None


# ---------------------------------------------------------------------------- errors

def _expected_text(expected: set[str]) -> str:
    names = sorted({_TERMINAL_TEXT.get(e, f"`{e}`") for e in expected if not e.startswith("__")})
    if len(names) > 6:
        names = names[:6] + ["..."]
    return ", ".join(names)


def _keyword_candidates(expected: set[str]) -> list[str]:
    words = []
    if "PREP" in expected:
        words += verbs.prepositions()
    if "USING" in expected:
        words.append("using")
    if "VERB" in expected:
        words += verbs.verb_names()
    if "TRUE" in expected or "FALSE" in expected:
        words += ["true", "false"]
    return words


def _syntax_error(e: lark.exceptions.LarkError, src: SourceFile, base: int, end: int) -> Diagnostic:
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        pos = base + e.pos_in_stream
        ch = src.text[pos] if pos < len(src.text) else ""
        span = src.span_at(pos, pos + 1)
        if ch in "\"'":
            return Diagnostic("E0102", "unterminated string", span,
                              help=f"close the string with {ch} on the same line")
        return Diagnostic("E0100", f"unexpected character `{ch}`", span,
                          help=f"expected {_expected_text(set(e.allowed))}")
    if isinstance(e, lark.exceptions.UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            pos = end
            span = src.span_at(max(base, pos - 1), pos)
            return Diagnostic("E0100", "statement ends too early", span,
                              help=f"expected {_expected_text(set(e.expected))} here")
        span = src.span_at(base + tok.start_pos, base + tok.end_pos)
        help_ = None
        cands = _keyword_candidates(set(e.expected))
        if tok.type == "NAME" and cands:
            close = suggest(str(tok), cands)
            if close:
                help_ = f"did you mean `{close[0]}`?"
        if tok.type == "VERB" and "NAME" in e.expected:
            msg = f"`{tok}` is a keyword and cannot be used as a name"
            return Diagnostic("E0100", msg, span, help="choose another name")
        if help_ is None:
            help_ = f"expected {_expected_text(set(e.expected))}"
        return Diagnostic("E0100", f"unexpected `{tok}`", span, help=help_)
    if isinstance(e, lark.exceptions.UnexpectedEOF):
        span = src.span_at(max(base, end - 1), end)
        return Diagnostic("E0100", "statement ends too early", span,
                          help=f"expected {_expected_text(set(e.expected))}")
    return Diagnostic("E0100", "syntax error", src.span_at(base, end))


# ---------------------------------------------------------------------------- entry point

@contextlib.contextmanager
def gc_paused():
    """Parsing and checking allocate a few objects per token and free none of them: with the
    cyclic collector on, its passes over the growing heap made a 50,000-line script take 2-3x
    longer. Nothing they build has reference cycles to collect."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # The objects made meanwhile sit in the youngest generation, and the first collection after
        # re-enabling would scan them all at once. freeze + unfreeze moves them to the oldest
        # generation (O(1), no scan), where they belong: an AST lives as long as its program.
        gc.freeze()
        gc.unfreeze()
        if was:
            gc.enable()


def parse(text: str, name: str = "<script>", *, fast: bool = True) -> ast.ScriptNode:
    """Parse a whole script. Raises SurgeryError with every syntax error found.

    Each statement goes through surgery/fastparse.py first (several times faster, same AST) and
    through lark when that parser declines it; ``fast=False`` uses lark only (tests compare)."""
    with gc_paused():
        return _parse(text, name, fast=fast)


def _parse(text: str, name: str, *, fast: bool) -> ast.ScriptNode:
    src = SourceFile(text, name)
    chunks, diags = split_statements(src)
    statements = []
    for start, end in chunks:
        piece = text[start:end]
        if fast:
            try:
                stmt = fastparse.parse_statement(src, piece, start, number_limit=MAX_NUMBER_DIGITS,
                                                 chain=chain_binop)
            except fastparse.Fallback:
                pass
            else:
                # Nesting deeper than MAX_EXPR_DEPTH takes at least that many characters.
                deep = _too_deep(stmt) if len(piece) > MAX_EXPR_DEPTH else None
                if deep is not None:
                    diags.append(deep)
                else:
                    statements.append(stmt)
                continue
        try:
            tree = _lark().parse(piece)
            stmt = _finish(_ToAst(src, start).transform(tree))
            deep = _too_deep(stmt)
            if deep is not None:
                diags.append(deep)
                continue
            statements.append(stmt)
        except lark.exceptions.VisitError as e:
            if isinstance(e.orig_exc, _AstError):
                diags.append(e.orig_exc.diag)
            else:
                raise
        except lark.exceptions.LarkError as e:
            diags.append(_syntax_error(e, src, start, end))
    if diags:
        raise SurgeryError(sorted(diags, key=lambda d: (d.span.start if d.span else 0))).with_source(src)
    return ast.ScriptNode(statements=statements, span=src.span_at(0, len(text)))
