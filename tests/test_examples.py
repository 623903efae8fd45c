"""Every example script checks cleanly, and those on zoo models also plan on the skeleton."""

from pathlib import Path

import pytest

import surgery

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.surg"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_checks(path):
    text = path.read_text()
    assert text.startswith("#"), "an example starts with a comment saying what it does"
    prog = surgery.compile(path)
    checked = prog.check()
    if all(m.source.startswith("zoo:") for m in checked.models.values()) and checked.models \
            and "lower" not in {s.verb for s in checked.steps}:
        plan = prog.plan()
        assert plan.skeleton
