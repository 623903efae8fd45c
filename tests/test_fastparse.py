"""surgery/fastparse.py gives exactly lark's AST (spans included) whenever it accepts a statement,
and defers everything else to lark."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from surgery.diagnostics import SurgeryError
from surgery.parser import parse

EXAMPLES = [p.read_text() for p in sorted((Path(__file__).parent.parent / "examples").glob("*.surg"))]
TRICKY = [
    'let x = data\n', 'let model = 1\n', 'let x = (a | b) | c\n', 'let x = a | (b | c)\n',
    'let x = (a)\n', 'let x = ((a))\n', 'let x = f((a), [b,], c=(d))\n', 'export onnx "x"\n',
    'export onnx(opset=17) "x"\n', 'export (onnx) "x"\n', 'prune x to to\n',
    'expect perplexity(c) <= 1.1 * original + -2\n', 'let x = - - 5\n', 'let x = -(a)\n',
    'let x = -50%\n', 'prune to 2:4\n', 'quantize using rtn()\n', 'let x = 2 : 4\n',
    'let x = 1e999\n', 'let x = ' + ' | '.join(f'm("{i}")' for i in range(40)) + '\n',
    'let x = (' + ' & '.join(f'm("{i}")' for i in range(20)) + ') | y\n',
    'let x = true\n', 'let x = f(true=1)\n', 'save "x"\n', 'lower a, b to triton in m\n',
    'surgery 1\n', 'let x = [a, b][0]\n', 'let x = "a\\:b"\n', "let x = 'q'\n",
    'let x = f(a=1, a=2)\n', 'let x = f(a=1, 2)\n', 'prune x to 2.5:4\n', 'let x = (\n  a |\n  b)\n',
    'let x = "\r"\n', 'let x = [' + '[' * 45 + ']' * 45 + ']\n', 'let x = ' + '-' * 60 + 'y\n',
    'let x = ' + ' + '.join(['1'] * 150) + '\n', 'quantize x to int8 using rtn(group=64) # c\n',
]
ALPHABET = list('abc_.*()[]"\',:%=|&-+/#<>012 \n') + ["to", "in", "using", "true", "data", "model",
                                                      "save", "2:4", "(", "export"]


def outcome(text: str, fast: bool):
    try:
        prog = parse(text, "f.surg", fast=fast)
        return "ok", prog.model_dump(), prog
    except SurgeryError as e:
        return "error", [(d.code, d.message, d.span) for d in e.diagnostics], None


def assert_same(text: str) -> None:
    a, b = outcome(text, True), outcome(text, False)
    assert a[:2] == b[:2], text
    if a[2] is not None:
        assert a[2] == b[2] and repr(a[2]) == repr(b[2])


@pytest.mark.parametrize("text", EXAMPLES + TRICKY)
def test_same_as_lark(text):
    assert_same(text)


def test_same_as_lark_on_mutants():
    rng = random.Random(11)
    for _ in range(1500):
        text = rng.choice(EXAMPLES + TRICKY)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randint(0, max(0, len(text) - 1))
            op = rng.random()
            if op < 0.4:
                text = text[:pos] + rng.choice(ALPHABET) + text[pos:]
            elif op < 0.7:
                text = text[:pos] + text[pos + rng.randint(1, 4):]
            else:
                text = text[:pos] + rng.choice(ALPHABET) + text[pos + 1:]
        assert_same(text)


def test_the_fast_path_is_taken(monkeypatch):
    """Ordinary statements never reach lark."""
    import surgery.parser

    monkeypatch.setattr(surgery.parser, "_lark", None)  # calling it would raise TypeError
    for text in EXAMPLES:
        parse(text)
