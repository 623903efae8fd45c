"""Grammar and AST: statements, values, selector precedence, spans."""

import pytest

from surgery import ast
from surgery.diagnostics import SurgeryError
from surgery.parser import parse


def stmt(text):
    return parse(text).statements[0]


def test_every_statement_kind_parses():
    prog = parse('''surgery 1
model base = "zoo:smollm2-135m"
model donor = "hf:./ckpt"
data calib = corpus("pydoc", samples=64, seqlen=256)
data notes = text("notes.txt", samples=32, seqlen=512)
let mlp = modules("model.layers.*.mlp.*_proj")
let attn = type(LlamaAttention)
let body = type(Linear) - modules("lm_head")
prune mlp to 2:4 using wanda(data=calib)
quantize body to int4 using gptq(group=64, data=calib)
swap softmax in attn for stablemax
adapt modules("**.q_proj", "**.v_proj") with lora(r=8, alpha=16, init=eva(data=calib))
merge base, donor using widen()
merge adapters in attn
lower stablemax to triton
expect perplexity(calib) <= 1.10 * original
export onnx "out/model.onnx"
save "out/model"
''')
    kinds = [s.kind for s in prog.statements]
    assert kinds == ["version", "model", "model", "data", "data", "let", "let", "let"] + ["verb"] * 7 \
        + ["expect", "verb", "verb"]


def test_values():
    call = stmt("quantize x to int4 using m(a=1, b=2.5, c=true, d=\"s\", e=2:4, f=50%, g=[1, 2], "
                "h=name, i=eva(rho=2), j=-3, k=1e-3)").using
    v = {k.name: k.value for k in call.kwargs}
    assert isinstance(v["a"], ast.Number) and v["a"].is_int and v["a"].value == 1
    assert v["b"].value == 2.5 and not v["b"].is_int
    assert v["c"].value is True
    assert v["d"].value == "s"
    assert (v["e"].n, v["e"].m) == (2, 4)
    assert v["f"].value == 50
    assert [x.value for x in v["g"].items] == [1, 2]
    assert v["h"].id == "name"
    assert v["i"].func == "eva" and v["i"].kwargs[0].name == "rho"
    assert v["j"].value == -3
    assert v["k"].value == pytest.approx(1e-3)


@pytest.mark.parametrize("text, shape", [
    ("a | b & c", ("|", "a", ("&", "b", "c"))),
    ("a & b - c", ("&", "a", ("-", "b", "c"))),
    ("a - b - c", ("-", ("-", "a", "b"), "c")),
    ("(a | b) & c", ("&", ("|", "a", "b"), "c")),
    ("a | b - c", ("|", "a", ("-", "b", "c"))),
])
def test_selector_precedence(text, shape):
    def tree(e):
        if isinstance(e, ast.BinOp):
            return (e.op, tree(e.left), tree(e.right))
        return e.id
    assert tree(stmt(f"let s = {text}").value) == shape


def test_spans_point_at_source():
    s = stmt('quantize type(Linear) to int8 using rtn(group=64)')
    assert (s.span.line, s.span.col) == (1, 1)
    kw = s.using.kwargs[0]
    assert (kw.span.line, kw.span.col, kw.span.end_col) == (1, 41, 46)


def test_continuation_lines_and_comments():
    prog = parse('let s = modules("a",\n    "b")  # two globs\n\n# a comment\nquantize s\n  to int8\n')
    assert len(prog.statements) == 2
    assert [a.value for a in prog.statements[0].value.args] == ["a", "b"]


def test_all_syntax_errors_reported_at_once():
    with pytest.raises(SurgeryError) as e:
        parse('quantise x to int8\nprune x tto 2:4\nmodel m = "unterminated\n')
    assert e.value.codes == ["E0101", "E0100", "E0102"]
    assert [d.span.line for d in e.value.diagnostics] == [1, 2, 3]
