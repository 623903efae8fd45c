"""Every diagnostic code is an enum member with a title and a long explanation that
`surgery explain` prints; every code raised anywhere in the sources is catalogued."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from surgery import __version__
from surgery.cli import main
from surgery.diagnostics import Code, Diagnostic, explanation

ROOT = Path(__file__).parent.parent
SOURCES = [p for d in ("surgery", "passes", "backends") for p in (ROOT / d).rglob("*.py")]


def _raised_codes() -> set[str]:
    found = set()
    for path in SOURCES:
        found |= set(re.findall(r"\bE\d{4}\b", path.read_text()))
    return found


def test_every_raised_code_is_catalogued():
    unknown = sorted(_raised_codes() - {c.value for c in Code})
    assert not unknown, f"codes used in the sources but missing from diagnostics.Code: {unknown}"


@pytest.mark.parametrize("code", list(Code), ids=[c.value for c in Code])
def test_every_code_has_an_explanation(code):
    text = explanation(code.value)
    assert text is not None, f"docs/errors/{code.value}.md is missing"
    assert text.startswith(f"# {code.value}: "), text[:80]
    assert len(text.splitlines()) >= 8 and "```" not in text.split("\n", 1)[0]


def test_an_uncatalogued_code_fails_where_it_is_raised():
    with pytest.raises(ValueError):
        Diagnostic("E9999", "no such code")


def test_explain_prints_the_explanation(capsys):
    assert main(["explain", "E0500"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# E0500: ") and "prune" in out
    assert main(["explain", "e0500"]) == 0  # case does not matter
    assert main(["explain", "E0599"]) == 2
    assert "no diagnostic code `E0599`" in capsys.readouterr().err


def test_version():
    out = subprocess.run([sys.executable, "-m", "surgery.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"surgery {__version__}"
