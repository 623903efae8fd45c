"""A hand-written parser for well-formed statements: the fast path in front of lark.

lark (grammar/surgery.lark) stays the definition of the language and the source of every syntax
error. Parsing one statement with it costs about 1 ms, so a generated 50,000-line script took a
minute; this parser takes a small fraction of that. It is deliberately conservative: whenever a
statement is anything but plainly well-formed (an unknown character, a keyword where a name goes,
a number the AST stage would refuse, nesting deeper than FAST_DEPTH ...), it raises
:class:`Fallback` and the statement goes through lark, which then gives the exact result or
diagnostic. When it does succeed, its AST, spans included, equals lark's; tests/test_fastparse.py
compares the two on the examples and on thousands of fuzzed statements.

Spans follow lark's ``propagate_positions``: a node spans from the start of its first child's
*container* to the end of its last child's, where the container of a parenthesised expression
includes the parentheses but the expression's own span does not. The parse functions return
(node, container start, container end).
"""

from __future__ import annotations

import math
import re

from surgery import ast, verbs
from surgery.astbuild import _finish, _new, string_value
from surgery.source import SourceFile, Span, _span

FAST_DEPTH = 40  # deeper nesting goes to lark (iterative there), never to Python's recursion limit



class _Words:
    """Keyword sets of the current verb table (grammar/surgery.lark's VERB, PATH_VERB and PREP
    terminals are built from the same table)."""

    def __init__(self, table):
        self.table = table
        self.verbs = frozenset(v.verb for v in table if not v.head_then_path)
        self.path_verbs = frozenset(v.verb for v in table if v.head_then_path)
        self.preps = frozenset(p for v in table for p in v.clauses)
        # Words with keyword terminals of priority 3 in the grammar. lark's contextual lexer
        # makes them keywords only where the parser state accepts one, which this parser does
        # not model: outside the places handled below they send the statement to lark. The
        # declaration words (`model`, `data` ...) are keywords only at the start of a statement,
        # and names everywhere else (`wanda(data=calib)`), in lark as here.
        self.reserved = self.verbs | self.path_verbs | self.preps | {"using", "true", "false"}


_words: _Words | None = None


def _current_words() -> _Words:
    global _words
    if _words is None or _words.table is not verbs.VERBS:
        _words = _Words(verbs.VERBS)
    return _words


BINARY = {"|": 1, "&": 2, "+": 3, "-": 3, "*": 4, "/": 4}

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<compare><=|>=|==|<|>)
  | (?P<punct>[()\[\],=:%|&+\-*/])
""", re.VERBOSE)


class Fallback(Exception):
    """Not a plainly well-formed statement: let lark parse it."""


def _tokens(piece: str) -> list[tuple[str, str, int, int]]:
    out, pos, n = [], 0, len(piece)
    match = _TOKEN.match
    while pos < n:
        m = match(piece, pos)
        if m is None:
            raise Fallback
        kind = m.lastgroup
        if kind != "ws":
            out.append((kind, m.group(), pos, m.end()))
        pos = m.end()
    out.append(("end", "", n, n))
    return out


class _Parser:
    def __init__(self, src: SourceFile, piece: str, base: int, number_limit: int, chain):
        self.src, self.base = src, base
        self.toks = _tokens(piece)
        self.i = 0
        self.number_limit = number_limit
        self.chain = chain  # parser._chain_binop: the same |/& chaining as the lark path
        self.depth = 0
        self.w = _current_words()
        self.one_line = "\n" not in piece
        self.line0, col = src.position(base)
        self.col0 = col  # column of piece offset 0

    # -- helpers
    def peek(self):
        return self.toks[self.i]

    def take(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, kind: str, text: str | None = None):
        t = self.take()
        if t[0] != kind or (text is not None and t[1] != text):
            raise Fallback
        return t

    def span(self, start: int, end: int) -> Span:
        if self.one_line:  # most statements: one line, so only the column moves
            line, col0 = self.line0, self.col0
            return _span(line, col0 + start, line, col0 + end, self.base + start, self.base + end)
        return self.src.span_at(self.base + start, self.base + end)

    def name_token(self):
        t = self.expect("word")
        if t[1] in self.w.reserved:
            raise Fallback
        return t

    # -- expressions (nodes carry their span; s/e are piece offsets)
    def expr(self, min_prec: int = 1):
        left, ls, le = self.unary()
        toks = self.toks
        while True:
            t = toks[self.i]
            prec = BINARY.get(t[1]) if t[0] == "punct" else None
            if prec is None or prec < min_prec:
                return left, ls, le
            self.i += 1
            right, rs, re_ = self.expr(prec + 1)
            left = self.chain(left, t[1], right, self.span(ls, re_))
            le = re_

    def unary(self):
        t = self.toks[self.i]
        if t[0] == "punct" and t[1] == "-":
            self.i += 1
            self.enter()
            operand, _, oe = self.unary()
            self.depth -= 1
            operand = _finish(operand)
            span = self.span(t[2], oe)
            if isinstance(operand, ast.Number):
                return _new(ast.Number, value=-operand.value, text="-" + operand.text, span=span), t[2], oe
            return _new(ast.Neg, operand=operand, span=span), t[2], oe
        return self.atom()

    def enter(self):
        self.depth += 1
        if self.depth > FAST_DEPTH:
            raise Fallback

    def number_text(self, t) -> str:
        if len(t[1]) > self.number_limit:
            raise Fallback
        return t[1]

    def atom(self):
        t = self.take()
        kind, text, s, e = t
        if kind == "number":
            nxt = self.peek()
            if nxt[0] == "punct" and nxt[1] == ":":
                self.i += 1
                m = self.expect("number")
                a, b = self.number_text(t), self.number_text(m)
                if not (a.isdigit() and b.isdigit()):
                    raise Fallback
                return _new(ast.Ratio, n=int(a), m=int(b), span=self.span(s, m[3])), s, m[3]
            value = float(self.number_text(t))
            if not math.isfinite(value):
                raise Fallback
            if nxt[0] == "word" and nxt[1] in ("step", "steps"):  # `200 steps`
                if not text.isdigit():
                    raise Fallback  # lark reports it
                self.i += 1
                return _new(ast.Count, value=int(text), text=text, span=self.span(s, nxt[3])), s, nxt[3]
            if nxt[0] == "punct" and nxt[1] == "%":
                self.i += 1
                return _new(ast.Percent, value=value, text=text, span=self.span(s, nxt[3])), s, nxt[3]
            return _new(ast.Number, value=value, text=text, span=self.span(s, e)), s, e
        if kind == "string":
            return _new(ast.String, value=string_value(text), span=self.span(s, e)), s, e
        if kind == "word":
            if text in ("true", "false"):
                return _new(ast.Bool, value=text == "true", span=self.span(s, e)), s, e
            if text in self.w.reserved:
                raise Fallback
            nxt = self.peek()
            if nxt[0] == "punct" and nxt[1] == "(":
                return self.call(t)
            return _new(ast.Name, id=text, span=self.span(s, e)), s, e
        if kind == "punct" and text == "(":
            self.enter()
            inner, is_, ie = self.expr()
            self.depth -= 1
            close = self.expect("punct", ")")
            # The node keeps its own span; its *container* (what a parent's span is computed
            # from, as in lark's propagate_positions) includes the parentheses.
            return inner, s, close[3]
        if kind == "punct" and text == "[":
            self.enter()
            items = []
            while not (self.peek()[0] == "punct" and self.peek()[1] == "]"):
                item, _, _ = self.expr()
                items.append(_finish(item))
                if self.peek()[0] == "punct" and self.peek()[1] == ",":
                    self.i += 1
                elif not (self.peek()[0] == "punct" and self.peek()[1] == "]"):
                    raise Fallback
            close = self.take()
            self.depth -= 1
            return _new(ast.ListExpr, items=items, span=self.span(s, close[3])), s, close[3]
        raise Fallback

    def call(self, name_tok):
        self.i += 1  # "("
        self.enter()
        args, kwargs = [], []
        while not (self.peek()[0] == "punct" and self.peek()[1] == ")"):
            t, nxt = self.peek(), self.toks[self.i + 1]
            if t[0] == "word" and nxt[0] == "punct" and nxt[1] == "=":
                if t[1] in self.w.reserved or any(k.name == t[1] for k in kwargs):
                    raise Fallback
                self.i += 2
                value, _, _ = self.expr()
                kwargs.append(_new(ast.Keyword, name=t[1], value=_finish(value),
                                          span=self.span(t[2], t[3])))
            else:
                if kwargs:
                    raise Fallback
                value, _, _ = self.expr()
                args.append(_finish(value))
            if self.peek()[0] == "punct" and self.peek()[1] == ",":
                self.i += 1
            elif not (self.peek()[0] == "punct" and self.peek()[1] == ")"):
                raise Fallback
        close = self.take()
        self.depth -= 1
        s = name_tok[2]
        return _new(ast.Call, func=name_tok[1], func_span=self.span(s, name_tok[3]), args=args,
                        kwargs=kwargs, span=self.span(s, close[3])), s, close[3]

    def full_expr(self):
        node, s, e = self.expr()
        return _finish(node), s, e

    # -- statements
    def statement(self):
        kind, word, s, e = self.take()
        if kind != "word":
            raise Fallback
        if word == "surgery":
            t = self.expect("number")
            if not t[1].isdigit() or len(t[1]) > self.number_limit:
                raise Fallback
            return self.done(_new(ast.VersionStmt, version=int(t[1]), span=self.span(s, t[3])))
        if word in ("model", "data", "let"):
            name = self.name_token()
            self.expect("punct", "=")
            value, _, ve = self.full_expr()
            span, name_span = self.span(s, ve), self.span(name[2], name[3])
            if word == "model":
                node = _new(ast.ModelStmt, name=name[1], name_span=name_span, source=value, span=span)
            elif word == "data":
                node = _new(ast.DataStmt, name=name[1], name_span=name_span, source=value, span=span)
            else:
                node = _new(ast.LetStmt, name=name[1], name_span=name_span, value=value, span=span)
            return self.done(node)
        if word == "expect":
            left, _, _ = self.full_expr()
            op = self.expect("compare")
            right, _, re_ = self.full_expr()
            return self.done(_new(ast.ExpectStmt, left=left, op=op[1], right=right,
                                            span=self.span(s, re_)))
        if word in self.w.path_verbs:  # export_stmt: PATH_VERB (name | call) string
            t = self.name_token()
            if self.peek()[0] == "punct" and self.peek()[1] == "(":
                what, _, _ = self.call(t)
            else:
                what = _new(ast.Name, id=t[1], span=self.span(t[2], t[3]))
            path = self.expect("string")
            node = _new(ast.String, value=string_value(path[1]), span=self.span(path[2], path[3]))
            return self.done(_new(ast.VerbStmt, verb=word, verb_span=self.span(s, e),
                                          operands=[what, node], span=self.span(s, path[3])))
        if word in self.w.verbs:
            return self.done(self.verb(word, s, e))
        raise Fallback

    def operands(self):
        items, end = [], None
        while True:
            node, _, end = self.full_expr()
            items.append(node)
            if self.peek()[0] == "punct" and self.peek()[1] == ",":
                self.i += 1
                continue
            return items, end

    def verb(self, word: str, s: int, e: int):
        operands, clauses, using, last = [], [], None, e
        t = self.peek()
        if t[0] != "end" and not (t[0] == "word" and (t[1] in self.w.preps or t[1] == "using")):
            operands, last = self.operands()
        while self.peek()[0] == "word" and self.peek()[1] in self.w.preps:
            prep = self.take()
            ops, last = self.operands()
            clauses.append(_new(ast.Clause, prep=prep[1], operands=ops, span=self.span(prep[2], last)))
        if self.peek()[0] == "word" and self.peek()[1] == "using":
            self.i += 1
            name = self.name_token()
            if not (self.peek()[0] == "punct" and self.peek()[1] == "("):
                raise Fallback
            using, _, last = self.call(name)
        return _new(ast.VerbStmt, verb=word, verb_span=self.span(s, e), operands=operands,
                            clauses=clauses, using=using, span=self.span(s, last))

    def done(self, node):
        if self.peek()[0] != "end":
            raise Fallback
        return node




def parse_statement(src: SourceFile, piece: str, base: int, *, number_limit: int, chain):
    """The AST of one statement, or Fallback."""
    try:
        return _Parser(src, piece, base, number_limit, chain).statement()
    except (IndexError, RecursionError):
        raise Fallback from None
