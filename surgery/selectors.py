"""Selectors: which modules a statement touches.

- ``modules("glob", ...)``: dotted module paths; ``*`` matches within one segment, ``**`` matches
  any number of whole segments (including none); ``?`` and ``[abc]`` work within a segment.
- ``re("regex")``: full match of the module path. Matching runs with a time budget per path
  (REGEX_BUDGET_S); a pattern that backtracks catastrophically, such as ``(.*)*x``, is refused
  with E0404 at the selector instead of hanging the compiler.
- ``type(Name)``: modules whose class, or a base class, is named ``Name``.
- ``a | b`` union, ``a & b`` intersection, ``a - b`` difference; ``-`` binds tighter than ``&``,
  which binds tighter than ``|`` (as in Python); parentheses group.
Every selector function takes ``allow_empty=true`` to accept matching nothing.
Results keep the model's ``named_modules()`` order.
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass
from functools import lru_cache

import regex  # the `re` API plus a per-match timeout
import torch.nn as nn

from surgery.diagnostics import Code, Diagnostic, SurgeryError, suggest
from surgery.source import Span


@dataclass(frozen=True)
class Selector:
    span: Span

    def matches(self, model: nn.Module, names: list[str]) -> set[str]:
        raise NotImplementedError

    def problems(self, model: nn.Module, names: list[str]) -> list[Diagnostic]:
        """Diagnostics for leaves of this selector that match nothing."""
        return []


REGEX_BUDGET_S = 0.05  # per module path; a slower match is refused (E0404)
REGEX_TOTAL_BUDGET_S = 0.5  # per selector, over all paths


def _segments_match(pattern: list[str], path: list[str]) -> bool:
    """Dynamic programming over (pattern segment, path segment): O(len(pattern) x len(path))
    segment comparisons. ``reach[j]`` says whether the pattern so far matches ``path[:j]``
    (the naive backtracking version is exponential in the number of ``**`` segments)."""
    n = len(path)
    reach = [True] + [False] * n
    for seg in pattern:
        if seg == "**":  # whole segments, none included: every j at or after a reachable one
            seen = False
            for j in range(n + 1):
                seen = seen or reach[j]
                reach[j] = seen
        else:
            for j in range(n, 0, -1):
                reach[j] = reach[j - 1] and fnmatch.fnmatchcase(path[j - 1], seg)
            reach[0] = False
        if not any(reach):
            return False
    return reach[n]


@lru_cache(maxsize=1 << 16)
def glob_match(pattern: str, name: str) -> bool:
    return _segments_match(pattern.split("."), name.split(".") if name else [])


def _generalize(name: str) -> str:
    """model.layers.12.mlp -> model.layers.*.mlp (for did-you-mean suggestions)."""
    return ".".join("*" if seg.isdigit() else seg for seg in name.split("."))


def nearest_paths(pattern: str, names: list[str], n: int = 1) -> list[str]:
    cands = sorted({_generalize(x) for x in names if x} | {x for x in names if x})
    return suggest(pattern, cands, n=n, cutoff=0.5)


@dataclass(frozen=True)
class Glob(Selector):
    patterns: tuple[str, ...]
    pattern_spans: tuple[Span, ...]
    allow_empty: bool = False

    def matches(self, model, names):
        return {n for n in names if any(glob_match(p, n) for p in self.patterns)}

    def problems(self, model, names):
        out = []
        for p, sp in zip(self.patterns, self.pattern_spans):
            if self.allow_empty or any(glob_match(p, n) for n in names):
                continue
            close = nearest_paths(p, names)
            help_ = f"did you mean `{close[0]}`?" if close else "no module path looks similar"
            out.append(Diagnostic("E0400", f"`{p}` matches no module", sp,
                                  help=help_ + " (`*` matches within one dotted segment, "
                                               "`**` across segments)"))
        return out


class RegexTooSlow(Exception):
    def __init__(self, path: str):
        self.path = path


def regex_matches(pattern: str, names: list[str]) -> set[str]:
    """Paths ``pattern`` fully matches, each match limited to REGEX_BUDGET_S and all of them to
    REGEX_TOTAL_BUDGET_S. Raises RegexTooSlow naming the path that ran out of time."""
    rx = regex.compile(pattern)
    out, t0 = set(), time.perf_counter()
    for n in names:
        try:
            if rx.fullmatch(n, timeout=REGEX_BUDGET_S):
                out.add(n)
        except TimeoutError:
            raise RegexTooSlow(n) from None
        if time.perf_counter() - t0 > REGEX_TOTAL_BUDGET_S:
            raise RegexTooSlow(n)
    return out


@dataclass(frozen=True)
class Regex(Selector):
    pattern: str
    allow_empty: bool = False

    def matches(self, model, names):
        try:
            return regex_matches(self.pattern, names)
        except RegexTooSlow as e:  # problems() reports this first; binding never gets here
            raise SurgeryError(self._too_slow(e.path)) from None

    def _too_slow(self, path: str) -> Diagnostic:
        return Diagnostic(
            Code.E0404, f"re(\"{self.pattern}\") takes too long to match `{path}`", self.span,
            help="the pattern backtracks catastrophically (a repeated group that can match the "
                 "same text in many ways, such as `(.*)*`); simplify it or use modules(\"...\")")

    def problems(self, model, names):
        try:
            hit = regex_matches(self.pattern, names)
        except RegexTooSlow as e:
            return [self._too_slow(e.path)]
        if self.allow_empty or hit:
            return []
        return [Diagnostic("E0400", f"re(\"{self.pattern}\") matches no module path", self.span,
                           help="the regular expression must match the whole dotted path")]


def class_names(module: nn.Module) -> list[str]:
    return [c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)]


@dataclass(frozen=True)
class TypeSel(Selector):
    type_name: str
    allow_empty: bool = False

    def matches(self, model, names):
        mods = dict(model.named_modules())
        return {n for n in names if self.type_name in class_names(mods[n])}

    def problems(self, model, names):
        if self.allow_empty or self.matches(model, names):
            return []
        present = {type(m).__name__ for m in model.modules()}
        close = suggest(self.type_name, present)
        help_ = (f"did you mean `{close[0]}`?" if close else
                 "module types in this model: " + ", ".join(sorted(present)[:12]))
        return [Diagnostic("E0400", f"no module of type `{self.type_name}` in the model",
                           self.span, help=help_)]


@dataclass(frozen=True)
class Everything(Selector):
    def matches(self, model, names):
        return set(names)


@dataclass(frozen=True)
class StateSel(Selector):
    """The modules that carry a state (``"adapted"``): the implicit selector of a form such as
    `train adapters`. Matching nothing is reported as E0340: there is nothing of that kind."""

    state: str

    def matches(self, model, names):
        from surgery.passapi import State, carried_states

        st = State(self.state)
        return {n for n in names if st in carried_states(model.get_submodule(n))}

    def problems(self, model, names):
        if self.matches(model, names):
            return []
        return [Diagnostic("E0340", f"nothing to train: no module is {self.state} at this point",
                           self.span, help="attach adapters earlier in the script, e.g. "
                           "`adapt modules(\"**.q_proj\") with lora(r=8)`, or name the modules "
                           "to train with a selector")]


@dataclass(frozen=True)
class SetOp(Selector):
    op: str
    left: Selector
    right: Selector

    def matches(self, model, names):
        a, b = self.left.matches(model, names), self.right.matches(model, names)
        return a | b if self.op == "|" else a & b if self.op == "&" else a - b

    def problems(self, model, names):
        return self.left.problems(model, names) + self.right.problems(model, names)


def resolve(selector: Selector, model: nn.Module) -> list[str]:
    """Matched module paths in model order (the root module, path '', is never selected)."""
    names = [n for n, _ in model.named_modules() if n]
    hit = selector.matches(model, names)
    return [n for n in names if n in hit]


@lru_cache(maxsize=4096)  # generated scripts repeat patterns; regex.compile is slow even cached
def validate_regex(pattern: str) -> str | None:
    """None if ``pattern`` compiles (with Python's `re` wording for errors, and with `regex`,
    which runs it)."""
    for engine in (re, regex):
        try:
            engine.compile(pattern)
        except (re.error, regex.error, OverflowError, RecursionError, ValueError) as e:
            return str(e) or type(e).__name__
    return None
