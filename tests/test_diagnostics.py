"""Snapshot tests of diagnostics: each broken script gives one expected code at an expected
line:col, and the full rendered message matches tests/snapshots/diagnostics/<case>.txt.

Regenerate snapshots after an intended wording change with UPDATE_SNAPSHOTS=1.
"""

import os
from pathlib import Path

import pytest

from surgery.api import Program
from surgery.diagnostics import CODES, SurgeryError

SNAP = Path(__file__).parent / "snapshots" / "diagnostics"
HEAD = 'model base = "zoo:smollm2-135m"\ndata calib = corpus("pydoc", samples=8, seqlen=64)\n' \
       'let body = type(Linear) - modules("lm_head")\n'

# name, script, code, line, col, needs a model (bind-time)
CASES = [
    ("unknown_statement", "quantise body to int8\n", "E0101", 1, 1, False),
    ("misspelled_preposition", HEAD + "quantize body tto int8\n", "E0100", 4, 15, False),
    ("unterminated_string", 'model base = "zoo:smollm2-135m\n', "E0102", 1, 14, False),
    ("unexpected_character", HEAD + "quantize body to int8 $\n", "E0100", 4, 23, False),
    ("statement_ends_early", HEAD + "quantize body to\n", "E0100", 4, 16, False),
    ("unknown_method", HEAD + "quantize body to int4 using gtpq(data=calib)\n", "E0201", 4, 29, False),
    ("unknown_parameter", HEAD + "quantize body to int4 using rtn(gruop=64)\n", "E0300", 4, 33, False),
    ("invalid_parameter_value", HEAD + 'quantize body to int4 using rtn(group="big")\n', "E0301", 4, 33, False),
    ("missing_clause", HEAD + "quantize body\n", "E0208", 4, 1, False),
    ("unexpected_clause", HEAD + "quantize body to int8 for body\n", "E0209", 4, 23, False),
    ("undefined_selector", HEAD + "quantize bdy to int8\n", "E0200", 4, 10, False),
    ("undefined_data", HEAD + "quantize body to int4 using gptq(data=calb)\n", "E0200", 4, 34, False),
    ("declared_twice", HEAD + "let body = type(Linear)\n", "E0202", 4, 5, False),
    ("unknown_selector_function", HEAD + 'quantize module("lm_head") to int8\n', "E0204", 4, 10, False),
    ("unsupported_version", "surgery 2\n" + HEAD, "E0103", 1, 1, False),
    ("unknown_zoo_model", 'model base = "zoo:smollm3"\n', "E0600", 1, 14, False),
    ("unknown_model_scheme", 'model base = "s3://bucket/model"\n', "E0600", 1, 14, False),
    ("unknown_corpus", 'model base = "zoo:smollm2-135m"\ndata calib = corpus("pydocs")\n', "E0206", 2, 21, False),
    ("unknown_data_source", 'model base = "zoo:smollm2-135m"\ndata calib = corpos("pydoc")\n', "E0206", 2, 14, False),
    ("unknown_metric", HEAD + "quantize body to int8\nexpect perplexty(calib) <= 10\n", "E0210", 5, 8, False),
    ("original_without_meaning", HEAD + "quantize body to int8\nexpect cosine(calib) >= original\n", "E0211", 5, 25, False),
    ("invalid_regex", HEAD + 'quantize re("model.(") to int8\n', "E0403", 4, 13, False),
    ("type_takes_a_name", HEAD + 'quantize type("Linear") to int8\n', "E0211", 4, 15, False),
    ("transform_after_save", HEAD + 'save "out/x"\nquantize body to int8\n', "E0209", 5, 1, False),
    ("merge_undefined_model", HEAD + "merge base, donr using linear()\n", "E0200", 4, 13, False),
    ("quantize_to_pattern", HEAD + "quantize body to 2:4\n", "E0303", 4, 18, False),
    ("parameter_given_twice", HEAD + "quantize body to int4 using rtn(group=64, group=32)\n", "E0304", 4, 43, False),
    ("gptq_without_data", HEAD + "quantize body to int4 using gptq(group=64)\n", "E0302", 4, 29, False),
    ("saved_twice", HEAD + 'quantize body to int8\nsave "a"\nsave "b"\n', "E0202", 6, 1, False),
    ("selector_not_a_string", HEAD + "quantize modules(lm_head) to int8\n", "E0211", 4, 18, False),
    ("glob_matches_nothing", HEAD + 'quantize modules("model.layers.*.mlp.up_projj") to int8\n', "E0400", 4, 18, True),
    ("type_matches_nothing", HEAD + "quantize type(Linaer) to int8\n", "E0400", 4, 10, True),
    ("quantize_twice", HEAD + "quantize body to int8\nquantize body to int4\n", "E0500", 5, 1, True),
    ("no_linear_selected", HEAD + 'quantize modules("model.norm") to int8\n', "E0401", 4, 10, True),
]


def _render(err: SurgeryError) -> str:
    return err.render() + "\n"


@pytest.mark.parametrize("name, text, code, line, col, bind", CASES, ids=[c[0] for c in CASES])
def test_diagnostic(name, text, code, line, col, bind, tiny_llama):
    prog = None
    with pytest.raises(SurgeryError) as exc:
        prog = Program(text, f"{name}.surg")
        prog.check()
        if bind:
            prog.plan(tiny_llama)
    err = exc.value
    first = err.diagnostics[0]
    assert (first.code, first.span.line, first.span.col) == (code, line, col), err.render()
    assert first.code in CODES
    snap = SNAP / f"{name}.txt"
    rendered = _render(err)
    if os.environ.get("UPDATE_SNAPSHOTS") or not snap.exists():
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.write_text(rendered)
        if not os.environ.get("UPDATE_SNAPSHOTS"):
            pytest.fail(f"snapshot {snap.name} was missing and has been written; rerun")
    assert rendered == snap.read_text()


def test_suite_is_large_enough():
    assert len(CASES) >= 25


def test_independent_errors_are_reported_together():
    text = HEAD + "quantize bdy to int8\nquantize body to int4 using rtn(gruop=64)\nexpect perplexty(calib) < 3\n"
    with pytest.raises(SurgeryError) as e:
        Program(text).check()
    assert e.value.codes == ["E0200", "E0300", "E0210"]


def test_json_form():
    with pytest.raises(SurgeryError) as e:
        Program("quantise x to int8\n", "x.surg").check()
    j = e.value.diagnostics[0].to_json()
    assert j["code"] == "E0101" and j["file"] == "x.surg"
    assert j["location"] == {"line": 1, "column": 1, "end_line": 1, "end_column": 9}
    assert "quantize" in j["help"]


def test_every_code_is_documented():
    doc = (Path(__file__).parent.parent / "docs" / "language.md").read_text()
    missing = [c for c in CODES if f"| {c} |" not in doc]
    assert not missing, f"codes missing from docs/language.md: {missing}"
