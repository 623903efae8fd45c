"""`lower OPS to triton`: op validation, the plan-time GPU refusal, the equivalence gate.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set at collection
(before triton is imported), the pass's CUDA probe is replaced and the block runs inside
``interpret_on_cpu()`` so lowered ops on CPU tensors go to the Triton launchers.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

import surgery  # noqa: E402
from surgery.diagnostics import SurgeryError  # noqa: E402
from surgery.passapi import PassError, RunContext  # noqa: E402
from surgery.passes.lower import runtime, sites  # noqa: E402
from surgery.passes.lower import triton as lower  # noqa: E402
from surgery.progress import Progress  # noqa: E402
from surgery.registry import get_pass  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'surgery[triton]')")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCRIPT = """
quantize modules("**.mlp.*_proj") to int4 using rtn(group=32)
swap softmax in type(LlamaAttention) for softplus(reweight=true)
lower softplus_attention, int4_linear to triton
"""


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a GPU exists and run lowered ops in the interpreter."""
    monkeypatch.setattr(lower, "cuda_available", lambda: True)
    with runtime.interpret_on_cpu():
        yield


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_ops_are_validated_with_did_you_mean():
    P = get_pass("lower", "triton")
    with pytest.raises(ValidationError, match="did you mean `softplus_attention`"):
        P.Params(ops=["softplus_atention"])
    with pytest.raises(ValidationError, match="at least one op"):
        P.Params(ops=[])
    assert P.Params(ops=["int4_linear", "int4_linear"]).ops == ["int4_linear"]
    with pytest.raises(ValidationError):
        P.Params(ops=["softmax"], softmax_algorithm="three_pass")


def test_without_cuda_lowering_is_a_plan_time_error(monkeypatch):
    monkeypatch.setattr(lower, "cuda_available", lambda: False)
    with pytest.raises(SurgeryError) as err:
        surgery.compile(SCRIPT).plan(_tiny_llama())
    assert "lowering to triton needs a CUDA GPU; none is available" in str(err.value)
    assert "line 4" in str(err.value) or ":4:" in str(err.value)


def test_without_cuda_apply_refuses_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(lower, "cuda_available", lambda: False)
    p = get_pass("lower", "triton")(lower.LowerParams(ops=["softmax"]))
    ctx = RunContext(model=nn.Softmax(-1), models={}, data={}, progress=Progress())
    with pytest.raises(PassError, match="needs a CUDA GPU"):
        p.run(ctx, {"": ctx.model})


def _swapped_quantized():
    res = surgery.apply(_tiny_llama(), SCRIPT.replace(
        "lower softplus_attention, int4_linear to triton", ""))
    return res.model


def test_script_end_to_end_lowers_and_keeps_outputs(fake_gpu):
    model = _swapped_quantized()
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    res = surgery.apply(model, "lower softplus_attention, int4_linear to triton")
    step = res.report.steps[-1].report
    assert step.metrics["lowered"] == {"softplus_attention": 2, "int4_linear": 6}
    assert step.metrics["max_rel_diff"] < 1e-4
    assert all(s["kernel_calls"] == 1 and s["fallback_calls"] == 0
               for s in step.per_module.values())
    attn = res.model.model.layers[0].self_attn
    assert isinstance(attn.triton_lowering, sites.TritonLowering)
    calls = attn.triton_lowering.counts.kernel
    with torch.no_grad():
        after = res.model(ids).logits
    assert attn.triton_lowering.counts.kernel == calls + 1  # the kernel ran in the forward
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_gate_rejects_a_wrong_kernel_and_undoes_the_step(fake_gpu, monkeypatch):
    from surgery.backends.triton import registry

    good = registry.KERNELS["softplus_attention"]
    monkeypatch.setitem(registry.KERNELS, "softplus_attention",
                        lambda *a: good(*a) * 1.01)  # 1% off: well outside the fp32 tolerance
    model = _swapped_quantized()
    with pytest.raises(SurgeryError) as err:
        surgery.apply(model, "lower softplus_attention, int4_linear to triton")
    msg = str(err.value)
    assert "does not match the reference" in msg and "float32 tolerance 0.0001" in msg
    assert "relative 0.01" in msg


def test_gate_failure_leaves_modules_unlowered(fake_gpu, monkeypatch):
    from surgery.backends.triton import registry

    monkeypatch.setitem(registry.KERNELS, "int4_linear", lambda x, *a: torch.zeros(
        *x.shape[:-1], a[0].shape[0], dtype=x.dtype))
    model = _swapped_quantized()
    swapped_forward = model.model.layers[0].self_attn.forward
    p = get_pass("lower", "triton")(lower.LowerParams(ops=["softplus_attention", "int4_linear"]))
    ctx = RunContext(model=model, models={}, data={}, progress=Progress())
    with pytest.raises(PassError, match="int4_linear in `model.layers.0.mlp.gate_proj`"):
        p.run(ctx, {"model": model.model})
    for _, m in model.named_modules():
        assert sites.MARKER not in m._modules
    assert "forward" not in model.model.layers[0].mlp.up_proj.__dict__
    # the attention module lowered before the failure got its swapped forward back
    assert model.model.layers[0].self_attn.forward == swapped_forward


class _Scores(nn.Module):
    def forward(self, x):
        return torch.softmax(x * 2.0, dim=-1) + torch.ops.surgery.log_stablemax(x, -1)


class _TinyLM(nn.Module):
    """Just enough of a language model for the gate to capture inputs from token ids."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"vocab_size": 50})()
        self.emb = nn.Embedding(50, 37)
        self.head = _Scores()

    def forward(self, input_ids, use_cache=False):
        return self.head(self.emb(input_ids) * 4)


@pytest.mark.parametrize("algorithm", ["fused", "online", "two_pass"])
def test_softmax_and_log_stablemax_calls_are_lowered(fake_gpu, algorithm):
    torch.manual_seed(0)
    model = _TinyLM()
    ids = torch.randint(0, 50, (3, 5))
    before = model(ids)
    p = get_pass("lower", "triton")(lower.LowerParams(ops=["softmax", "log_stablemax"],
                                                      softmax_algorithm=algorithm))
    rep = p.run(RunContext(model=model, models={}, data={}, progress=Progress()),
                  {"head": model.head}).report
    assert rep.per_module["head"]["kernel_calls"] == 2  # one softmax, one log_stablemax
    assert rep.metrics["lowered"] == {"log_stablemax": 1, "softmax": 1}
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)
    assert model.head.triton_lowering.counts.kernel == 4


def test_gate_needs_inputs_it_can_build():
    pass_ = get_pass("lower", "triton")(lower.LowerParams(ops=["softmax"]))
    seq = nn.Sequential(nn.Linear(8, 37), _Scores())
    ctx = RunContext(model=seq, models={}, data={}, progress=Progress())
    with runtime.interpret_on_cpu(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(lower, "cuda_available", lambda: True)
        with pytest.raises(PassError, match="cannot build example inputs for `1`") as err:
            pass_.run(ctx, {"1": seq[1]})
    assert err.value.hint == "pass data=NAME so the gate runs on captured inputs"


def test_stablemax_swap_is_lowered(fake_gpu):
    model = _tiny_llama()
    res = surgery.apply(model, """
swap softmax in type(LlamaAttention) for stablemax
lower stablemax to triton in type(LlamaAttention)
""")
    step = res.report.steps[-1].report
    assert step.metrics["lowered"] == {"stablemax": 2}
    assert step.metrics["max_rel_diff"] < 1e-4


def test_nothing_to_lower_is_an_error(fake_gpu):
    model = _tiny_llama()
    with pytest.raises(SurgeryError, match="no int8_linear found"):
        surgery.apply(model, "lower int8_linear to triton")


def test_marker_round_trips_its_config():
    m = sites.TritonLowering("attention", ["softplus_attention"], "online")
    again = sites.TritonLowering.from_surgery_config(m.surgery_config())
    assert again.surgery_config() == m.surgery_config()


@pytest.mark.slow
def test_smollm2_lssar_int4_lowered_in_the_interpreter(fake_gpu):
    from surgery.data import corpus
    from surgery.models import load_model

    lm = load_model("zoo:smollm2-135m")
    ds = corpus(lm.tokenizer, "pydoc", samples=4, seqlen=48, seed=0)
    res = surgery.apply(lm.model, """
quantize modules("model.layers.*.mlp.*_proj") to int4 using rtn(group=64)
swap softmax in type(LlamaAttention) for softplus(reweight=true)
""")
    model = res.model
    ids = ds.evaluation[:1]
    with torch.no_grad():
        before = model(ids).logits
    p = get_pass("lower", "triton")(lower.LowerParams(ops=["softplus_attention", "int4_linear"],
                                                      data="calib", samples=1))
    ctx = RunContext(model=model, models={}, data={"calib": ds}, progress=Progress())
    # two decoder layers: the interpreter needs minutes per layer on a busy 2-core machine
    rep = p.run(ctx, {f"model.layers.{i}": model.model.layers[i] for i in (0, 29)}).report
    assert rep.metrics["lowered"] == {"softplus_attention": 2, "int4_linear": 6}
    assert rep.metrics["max_rel_diff"] < 1e-4
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-4
