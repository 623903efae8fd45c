"""ONNX translations of the kernel ops, and the export of a model that went through quantize +
prune + attention swap + adapters + lowering together, checked in ONNX Runtime."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the lowering step runs its gate in the interpreter

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

import surgery  # noqa: E402
import surgery.backends.onnx.translations_kernels  # noqa: E402,F401 - registers translations
from surgery.backends.onnx.export import _quiet  # noqa: E402
from surgery.backends.onnx.translations import TRANSLATIONS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class _Ops(torch.nn.Module):
    def __init__(self, causal: bool, power: float, masked: bool):
        super().__init__()
        self.causal, self.power, self.masked = causal, power, masked

    def forward(self, x, q, k, v, key_mask):
        return (torch.ops.surgery.stablemax(x, -1), torch.ops.surgery.log_stablemax(x, 0),
                torch.ops.surgery.softmax(x, -1, "two_pass"),
                torch.ops.surgery.softplus_attention(q, k, v, key_mask if self.masked else None,
                                                     self.causal, self.power, 1e-8, True))


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g) * 3
    q = torch.randn(2, 4, 9, 8, generator=g)
    k = torch.randn(2, 2, 9, 8, generator=g)
    v = torch.randn(2, 2, 9, 8, generator=g)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding: 3 fully masked query rows in batch 1
    return x, q, k, v, key_mask


@pytest.mark.parametrize("causal,power,masked", [(True, 15.0, True), (True, 0.0, True),
                                                 (False, 0.0, False), (False, 3.0, True)])
def test_kernel_ops_export_to_standard_onnx_and_match_in_ort(tmp_path, causal, power, masked):
    module = _Ops(causal, power, masked)
    inputs = _inputs()
    with _quiet():
        prog = torch.onnx.export(module, inputs, dynamo=True, opset_version=21, optimize=True,
                                 custom_translation_table=dict(TRANSLATIONS))
    path = tmp_path / "ops.onnx"
    prog.save(str(path))
    ops = {n.op_type for n in prog.model.graph}
    assert all(n.domain in ("", "ai.onnx") for n in prog.model.graph)  # standard ops only
    assert {"Softplus", "ReduceL2", "Softmax"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    for got, ref in zip(sess.run(None, feeds), module(*inputs)):
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=5e-6)


@pytest.mark.slow
def test_export_after_quantize_prune_swap_adapters_and_lowering(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgery.passes.lower.triton as lower
    from surgery.passes.lower.runtime import interpret_on_cpu

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    monkeypatch.setattr(lower, "cuda_available", lambda: True)
    with interpret_on_cpu():
        res = surgery.apply(model, f"""
prune modules("**.mlp.*_proj") to 2:4 using magnitude()
quantize modules("**.mlp.*_proj") to int4 using rtn(group=32)
swap softmax in type(LlamaAttention) for softplus(reweight=true)
adapt modules("**.q_proj", "**.v_proj") with lora(r=4, alpha=8)
lower softplus_attention, int4_linear to triton
export onnx "{tmp_path}/model.onnx"
""")
    steps = {s.verb: s.report for s in res.report.steps}
    assert steps["lower"].metrics["lowered"] == {"softplus_attention": 2, "int4_linear": 6}
    export = steps["export"].metrics
    assert export["verified"] and export["max_rel_diff"] < 1e-4
    assert export["ops"]["com.microsoft::MatMulNBits"] == 6 and export["ops"]["Softplus"] == 2
    # and independently of the exporter's own check: ORT vs PyTorch on new token ids
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(5))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        ref = res.model(ids).logits.numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
