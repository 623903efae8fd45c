"""Random mutations of the example scripts only ever yield a program or a SurgeryError."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.api import Program
from surgery.diagnostics import SurgeryError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.surg"))
SEEDS = [p.read_text() for p in EXAMPLES] + [
    'model base = "zoo:smollm2-135m"\ndata calib = corpus("pydoc", samples=8, seqlen=64)\n'
    'let mlp = modules("model.layers.*.mlp.*_proj") | re("lm_.*") & type(Linear) - modules("x")\n'
    'prune mlp to 2:4 using wanda(data=calib)\nquantize mlp to int4 using gptq(group=64, data=calib)\n'
    'swap softmax in type(LlamaAttention) for softplus(reweight=true, p=15)\n'
    'adapt modules("**.q_proj") with lora(r=8, alpha=16, init=eva(data=calib))\n'
    'merge adapters in mlp\nlower stablemax, int4_linear to triton in mlp\n'
    'expect perplexity(calib) <= 1.10 * original\nexport onnx "out/m.onnx"\nsave "out/m"\n',
]
ALPHABET = list('abcdefghijklmnopqrstuvwxyz_.*()[]"\',:%=|&-+/#<>0123456789 \n\t') + [
    "quantize", "prune", "to", "using", "in", "for", "with", "into", "let", "model", "data",
    "expect", "2:4", "50%", "true", "modules(", "type(", "re(", "\\", "\u00e9", "\x00"]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "swap_lines", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(text) - 1)))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(ALPHABET)) + text[pos:]
        elif op == "delete":
            n = draw(st.integers(1, 8))
            text = text[:pos] + text[pos + n:]
        elif op == "replace":
            text = text[:pos] + draw(st.sampled_from(ALPHABET)) + text[pos + 1:]
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "swap_lines":
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(j, lines[i])
            text = "\n".join(lines)
    return text


@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutated())
def test_mutations_never_crash(text):
    try:
        Program(text, "fuzz.surg").check()
    except SurgeryError as e:
        assert e.diagnostics and all(d.code and d.message for d in e.diagnostics)
        e.render()  # rendering never fails either
