"""The builder produces the same program as parsing its printed text."""

import surgery
from surgery.builder import Ref
from surgery.parser import parse
from surgery.printer import to_text


def test_builder_round_trip():
    s = (surgery.Script().version(1)
         .model("base", "zoo:smollm2-135m")
         .data("calib", "pydoc", samples=16, seqlen=128)
         .let("body", "type(Linear) - modules('lm_head')")
         .quantize("body", to="int4", using="gptq", group=64, data="calib", act_order=True)
         .prune("modules('model.layers.*.mlp.*_proj')", to="2:4", using="wanda", data="calib")
         .adapt("modules('**.q_proj')", with_="lora", r=8, alpha=16.5, init=Ref("gaussian"))
         .expect("perplexity(calib) <= 1.10 * original")
         .export("onnx", "out/m.onnx", int4="qdq")
         .save("out/model"))
    text = s.to_text()
    assert surgery.compile(text).ast.same_as(s.program())
    # printing a parsed program is a fixed point
    assert to_text(parse(text)) == text


def test_issue_example_round_trip():
    s = surgery.Script().quantize("type(Linear) - modules('lm_head')", to="int8")
    text = s.to_text()
    assert text == 'quantize type(Linear) - modules("lm_head") to int8\n'
    assert surgery.compile(text).ast.same_as(s.program())


def test_printer_keeps_precedence():
    text = 'let s = (modules("a") | modules("b")) & type(Linear) - re("x.*")\n'
    prog = parse(text)
    assert parse(to_text(prog)).same_as(prog)
    assert to_text(prog) == text
