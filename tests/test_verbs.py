"""The verb table drives the parser, the checker, the builder and the printer; docs/writing-passes.md
shows how to add a method (one file) and a verb (one row plus a pass file), and this file runs
those code blocks literally."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from surgery import parser, registry, verbs
from surgery.api import Program
from surgery.builder import Script
from surgery.diagnostics import SurgeryError
from surgery.verbs import Part, Slot, VerbSpec

DOC = Path(__file__).parent.parent / "docs" / "writing-passes.md"


def _blocks(heading: str) -> list[str]:
    text = DOC.read_text()
    section = text.split(f"### {heading}", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def clean_registry():
    before = dict(registry._PASSES)
    yield
    registry._PASSES.clear()
    registry._PASSES.update(before)


def test_every_pass_declares_the_fields_its_verb_fills():
    for cls in registry.all_passes():
        forms = [f for f in verbs.forms(cls.verb) if f.method in (None, cls.method)]
        assert forms, f"no verb form for {cls.verb}/{cls.method}"
        assert any(f.fields == cls.statement_fields for f in forms), \
            (cls.verb, cls.method, cls.statement_fields, [f.fields for f in forms])


def test_keywords_and_usage_come_from_the_table():
    assert parser.statement_keywords()[-len(verbs.verb_names()):] == verbs.verb_names()
    assert set(verbs.prepositions()) == {"to", "with", "in", "for", "into", "of", "on"}  # of: drop
    assert verbs.usage("merge") == ("usage: merge adapters [in SELECTOR]  or  "
                                    "merge A, B [into BASE] using METHOD(...)")


def test_wrong_value_in_a_clause_names_the_expected_kind_and_usage():
    with pytest.raises(SurgeryError) as e:
        Program("quantize type(Linear) to 50%\n").check()
    d = e.value.diagnostics[0]
    assert d.code == "E0303" and "a format such as int8 or int4" in d.message
    assert d.help.startswith("usage: quantize SELECTOR to")


def test_words_get_did_you_mean_and_no_pydantic_wording():
    with pytest.raises(SurgeryError) as e:
        Program("quantize type(Linear) to INT8\n").check()
    d = e.value.diagnostics[0]
    assert (d.code, d.help) == ("E0303", "did you mean `int8`?")
    assert "Input should" not in d.message
    bad = ['quantize type(Linear) to int4 using rtn(group="big")',
           "quantize type(Linear) to int4 using rtn(group=-8)",
           "lower softmax to triton using triton(softmax_algorithm=Fused)",
           "adapt type(Linear) with lora(r=0)",
           "prune type(Linear) to 2:4 using magnitude(scope=globl)"]
    for line in bad:
        with pytest.raises(SurgeryError) as e:
            Program(line + "\n").check()
        text = e.value.render()
        assert "Input should" not in text and "Value error" not in text, text
    with pytest.raises(SurgeryError) as e:
        Program("prune type(Linear) to 50% using magnitude(scope=Row)\n").check()
    assert e.value.diagnostics[0].help == "did you mean `row`?"


def test_adding_a_method_as_documented(clean_registry):
    (block,) = _blocks("Worked example: a method in one file")
    exec(compile(block, "passes/prune/halve.py", "exec"), {"__name__": "halve_doc"})
    net = nn.Sequential(nn.Linear(4, 4))
    w = net[0].weight.detach().clone()
    result = Program("prune type(Linear) to 50% using halve(factor=0.25)\n").apply(net)
    assert torch.equal(result.model[0].weight, 0.25 * w)


def test_adding_a_verb_as_documented(clean_registry, monkeypatch):
    row, pass_file = _blocks("Worked example: a verb is one table row plus its pass file")
    ns = {"VerbSpec": VerbSpec, "Part": Part, "Slot": Slot}
    (spec,) = eval("(" + row + ")", ns)
    monkeypatch.setattr(verbs, "VERBS", verbs.VERBS + (spec,))
    try:
        exec(compile(pass_file, "passes/scale/constant.py", "exec"), {"__name__": "scale_doc"})
        net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        before = [m.weight.detach().clone() for m in (net[0], net[2])]
        text = Script().scale("type(Linear)", by=0.5).to_text()
        assert text == "scale type(Linear) by 0.5\n"
        result = Program(text).apply(net)
        for m, w in zip((result.model[0], result.model[2]), before):
            assert torch.equal(m.weight, 0.5 * w)
        with pytest.raises(SurgeryError) as e:
            Program('scale type(Linear) by "x"\n').check()
        assert e.value.diagnostics[0].code == "E0301"
        with pytest.raises(SurgeryError) as e:
            Program("scale type(Linear)\n").check()
        d = e.value.diagnostics[0]
        assert d.code == "E0208" and d.help == "usage: scale SELECTOR by NUMBER [using METHOD(...)]"
    finally:
        monkeypatch.undo()
    with pytest.raises(SurgeryError) as e:  # gone with its row
        Program("scale type(Linear) by 0.5\n").check()
    assert e.value.diagnostics[0].code == "E0101"
