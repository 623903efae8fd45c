"""Bit widths 2 to 8: formats, the dense bit-stream packing, QuantLinear storage, GPTQ, save/load,
and the located error for a width outside 2..8 (fast, tiny shapes)."""

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.backends.ops.quant import pack_bits, unpack_bits
from surgery.diagnostics import SurgeryError
from surgery.models import LoadedModel, load_model
from surgery.passes.quantize.formats import BITS, Format, dequantize_codes, grouped
from surgery.passes.quantize.gptq import gptq_quantize
from surgery.passes.quantize.qlinear import QuantLinear
from surgery.passes.quantize.rtn import rtn_quantize

WIDTHS = [b for b in BITS if b != 8]  # int8 symmetric keeps [-127, 127]


def test_bit_stream_layout_by_hand():
    # int3 codes 1..7 then 5: stream bits LSB first, element k at bits [3k, 3k + 3)
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 5, 0, 0, 7]])
    words = pack_bits(codes, 3)
    assert words.shape == (1, 2) and words.dtype == torch.int32
    expected = sum(int(c) << (3 * k) for k, c in enumerate(codes[0]))  # 33 bits
    lo, hi = expected & 0xFFFFFFFF, expected >> 32
    assert int(words[0, 0]) & 0xFFFFFFFF == lo and int(words[0, 1]) == hi
    assert hi == 1  # element 10 (code 7 = 0b111) straddles the two words


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 10, 32, 33, 100])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (4, n), generator=g)
    words = pack_bits(codes, bits)
    assert words.shape == (4, (n * bits + 31) // 32)
    assert torch.equal(unpack_bits(words, n, bits), codes.to(torch.int32))


@pytest.mark.parametrize("bits", WIDTHS)
def test_symmetric_ranges_follow_the_ort_flavour(bits):
    fmt = Format(bits, True)
    assert (fmt.qmin, fmt.qmax) == (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    assert (Format(bits, False).qmin, Format(bits, False).qmax) == (0, (1 << bits) - 1)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_within_a_step_and_codes_in_range(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(24, 64)
    fmt = Format(bits, sym)
    q, s, z = rtn_quantize(w, fmt, 16)
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    w_hat = dequantize_codes(grouped(q, 16), s, z).reshape(w.shape)
    step = s.abs().repeat_interleave(16, 1)
    err = (w - w_hat).abs()
    assert torch.all(err <= step + 1e-6)
    if not sym:  # the asymmetric grid covers [min, max]: half a step at most
        assert torch.all(err <= step / 2 + 1e-6)


def test_error_halves_per_bit():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    errs = []
    for bits in BITS:
        q, s, z = rtn_quantize(w, Format(bits, False), 32)
        w_hat = dequantize_codes(grouped(q, 32), s, z).reshape(w.shape)
        errs.append(float((w - w_hat).norm() / w.norm()))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.7 < r < 2.4 for r in ratios), ratios


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [True, False])
def test_quantlinear_storage_forward_and_state_dict(bits, sym):
    torch.manual_seed(0)
    lin = nn.Linear(80, 24)
    q, s, z = rtn_quantize(lin.weight, Format(bits, sym), 16)
    layer = QuantLinear.from_codes(q, s, z, bits=bits, bias=lin.bias)
    if bits == 4:
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (24, 40)
    else:
        assert layer.qweight.dtype == torch.int32
        assert layer.qweight.shape == (24, (80 * bits + 31) // 32)
    assert torch.equal(layer.codes().to(torch.int32), q)
    w_hat = dequantize_codes(grouped(q, 16), s, z).reshape(24, 80)
    assert torch.equal(layer.dequantized_weight(), w_hat)
    x = torch.randn(3, 80, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ w_hat.T + lin.bias, rtol=0, atol=1e-5)
    y.sum().backward()  # gradients reach the input through the custom op
    torch.testing.assert_close(x.grad, w_hat.sum(0).expand(3, -1), rtol=0, atol=1e-5)
    back = QuantLinear.from_surgery_config(layer.surgery_config())
    back.load_state_dict(layer.state_dict())
    assert torch.equal(back.dequantized_weight(), w_hat)


def test_int3_gptq_beats_rtn_on_the_output_error():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs
    H = 2 / 512 * X.T @ X
    fmt = Format(3, False)
    r = gptq_quantize(W, H, fmt, 16)
    q, s, z = rtn_quantize(W, fmt, 16)

    def out_err(codes, scales, zeros):
        w_hat = dequantize_codes(grouped(codes, 16), scales, zeros).reshape(W.shape)
        return float(((W - w_hat) @ X.T).norm())

    assert r.codes.min() >= 0 and r.codes.max() <= 7
    assert out_err(r.codes, r.scales, r.zeros) < 0.8 * out_err(q, s, z)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("zoo:smollm2-135m").tokenizer


def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      architectures=["LlamaForCausalLM"])
    return LoadedModel(model=LlamaForCausalLM(cfg).eval(), source="tiny", tokenizer=tokenizer,
                       config=cfg.to_dict())


SCRIPT = """\
model base  = "zoo:smollm2-135m"
data  calib = corpus("pydoc", samples=4, seqlen=32)
quantize modules("model.layers.*.mlp.*_proj") to int3 using gptq(data=calib, group=32)
quantize modules("model.layers.*.self_attn.[qk]_proj") to int2 using rtn(group=16, symmetric=true)
quantize modules("model.layers.*.self_attn.v_proj") to int5
quantize modules("model.layers.*.self_attn.o_proj") to int6 using rtn(group=32)
save "{out}"
"""


def test_mixed_widths_save_and_load_exactly(tmp_path, tokenizer):
    result = surgery.apply(tiny(tokenizer), SCRIPT.format(out=tmp_path / "m"))
    model = result.model
    widths = {n.split(".", 3)[-1]: m.bits for n, m in model.named_modules()
              if isinstance(m, QuantLinear)}
    assert widths == {"mlp.gate_proj": 3, "mlp.up_proj": 3, "mlp.down_proj": 3,
                      "self_attn.q_proj": 2, "self_attn.k_proj": 2, "self_attn.v_proj": 5,
                      "self_attn.o_proj": 6}
    back = surgery.load(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("fmt", ["int1", "int9", "int16"])
def test_width_outside_2_to_8_is_a_located_error(fmt):
    text = ('model base = "zoo:smollm2-135m"\n'
            f'quantize modules("model.layers.0.mlp.up_proj") to {fmt} using rtn(group=64)\n')
    with pytest.raises(SurgeryError) as e:
        surgery.compile(text).check()
    d = e.value.diagnostics[0]
    assert d.code == "E0303"
    assert (d.span.line, d.span.col) == (2, text.splitlines()[1].index(fmt) + 1)
    assert "int2, int3, int4, int5, int6, int7, int8" in str(e.value)
