"""One Op record per custom op (backends/ops/registry.py) drives lowering, kernels and ONNX."""

from __future__ import annotations

import pytest
import torch

from surgery.backends.ops import registry as R


def test_every_surgery_kernel_op_has_a_record_with_a_working_reference():
    ops = R.all_ops()
    assert set(ops) == {"stablemax", "log_stablemax", "stablemax_backward", "softmax",
                        "softplus_attention", "int4_linear", "int8_linear",
                        "linear_cross_entropy", "linear_cross_entropy_backward"}
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name in ("stablemax", "log_stablemax"):
        assert torch.equal(ops[name].reference(x, -1), getattr(torch.ops.surgery, name)(x, -1))
    assert torch.equal(ops["softmax"].reference(x, -1, "online"),
                       torch.ops.surgery.softmax(x, -1, "online"))
    for op in ops.values():
        assert op.overload is getattr(torch.ops.surgery, op.name).default


def test_lowering_reads_its_vocabulary_and_sites_from_the_records():
    from surgery.passes.lower import sites
    from surgery.passes.lower.triton import KNOWN_OPS

    assert KNOWN_OPS == ("int4_linear", "int8_linear", "log_stablemax", "softmax",
                         "softplus_attention", "stablemax")
    assert R.ops_at("quant", 4) == ["int4_linear"] and R.ops_at("quant", 8) == ["int8_linear"]
    assert R.ops_at("attention", "stablemax") == ["stablemax"]
    assert R.ops_at("attention", "softplus") == ["softplus_attention"]
    assert R.ops_at("generic") == ["log_stablemax", "softmax", "stablemax"]
    assert sites.site_kind(torch.nn.Softmax(-1), {"softmax", "int4_linear"}) == \
        ("generic", ["softmax"])


def test_onnx_translations_come_from_the_records():
    pytest.importorskip("onnxscript", reason="onnx export needs onnxscript")
    from surgery.backends.onnx.translations import TRANSLATIONS

    named = {op.overload for op in R.all_ops().values() if op.onnx}
    ops = torch.ops.surgery
    assert named == {ops.stablemax.default, ops.log_stablemax.default, ops.softmax.default,
                     ops.softplus_attention.default}
    assert named <= set(TRANSLATIONS)


def test_a_new_op_is_one_record(monkeypatch):
    """Registering a record is all `lower` needs to accept the name and find its sites."""
    monkeypatch.setattr(R, "_OPS", dict(R.all_ops()))
    R.register_op(R.Op("toy_norm", reference=lambda x, dim: x, sites=(("generic", None),)))
    assert "toy_norm" in R.lowerable_ops() and "toy_norm" in R.ops_at("generic")
    with pytest.raises(ValueError, match="site kind"):
        R.Op("bad", reference=lambda x: x, sites=(("everywhere", None),))


def test_lazy_binds_keyword_arguments():
    lazy = R.Lazy("math:pow")
    assert lazy(2, 10) == 1024
    assert R.Lazy("builtins:round", ndigits=1)(2.345) == 2.3
