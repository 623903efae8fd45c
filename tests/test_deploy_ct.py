"""QuantLinear <-> compressed-tensors, layer by layer: our state round-trips bit for bit, and
compressed-tensors' own decompressor gives exactly our dequantised weight."""

from __future__ import annotations

import pytest
import torch

from surgery.deploy import compressed_tensors as ct
from surgery.passes.quantize.qlinear import QuantLinear

pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the test extra")


def _layer(bits, symmetric, group, in_features=48, out_features=20, perm=False, bias=True):
    g = torch.Generator().manual_seed(bits * 100 + group)
    half = 1 << (bits - 1)
    lo, hi = ((-half, half - 1) if bits < 8 else (-127, 127)) if symmetric else (0, 2 ** bits - 1)
    codes = torch.randint(lo, hi + 1, (out_features, in_features), generator=g)
    ng = in_features // group
    scales = torch.randn(out_features, ng, generator=g) * 0.01  # negative ones too (ORT int4)
    zeros = None if symmetric else torch.randint(0, 2 ** bits, (out_features, ng), generator=g)
    p = torch.randperm(in_features, generator=g) if perm else None
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, bits=bits, bias=b, perm=p)


FORMATS = [(bits, sym, group) for bits in range(2, 9) for sym in (True, False)
           for group in (16, 48)]


@pytest.mark.parametrize("bits,symmetric,group", FORMATS)
def test_round_trip_and_compressed_tensors_dequantisation(bits, symmetric, group):
    from compressed_tensors.compressors import BaseCompressor

    layer = _layer(bits, symmetric, group)
    tensors, extras = ct.to_ct(layer)
    assert tensors["weight_packed"].dtype == torch.int32 and not extras
    back = ct.from_ct(layer.surgery_config(), tensors, extras)
    for k, v in layer.state_dict().items():
        assert torch.equal(back[k], v), k
    qconfig = ct.quantization_config({"l": layer}, ["l"])
    (scheme,) = qconfig.config_groups.values()
    dense = BaseCompressor.get_value_from_registry(ct.FORMAT).decompress(
        {k: v for k, v in tensors.items() if k != "bias"}, scheme)["weight"]
    assert torch.equal(dense, layer.dequantized_weight())


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_odd_width_per_channel(bits):
    layer = _layer(bits, False, 45, in_features=45)
    tensors, extras = ct.to_ct(layer)
    back = ct.from_ct(layer.surgery_config(), tensors, extras)
    assert all(torch.equal(back[k], v) for k, v in layer.state_dict().items())


def test_per_channel_permutation_is_undone_for_the_format_and_kept_for_us():
    from compressed_tensors.compressors import BaseCompressor

    layer = _layer(4, True, 48, perm=True)
    assert ct.refusal(layer) is None
    tensors, extras = ct.to_ct(layer)
    assert torch.equal(extras["perm"], layer.perm)
    (scheme,) = ct.quantization_config({"l": layer}, ["l"]).config_groups.values()
    dense = BaseCompressor.get_value_from_registry(ct.FORMAT).decompress(
        {k: v for k, v in tensors.items() if k != "bias"}, scheme)["weight"]
    assert torch.equal(dense, layer.dequantized_weight())  # original column order
    back = ct.from_ct(layer.surgery_config(), tensors, extras)
    assert all(torch.equal(back[k], v) for k, v in layer.state_dict().items())


def test_grouped_permutation_has_no_form():
    layer = _layer(4, True, 16, perm=True)
    assert "static_groups=true" in ct.refusal(layer)


def test_mixed_schemes_get_one_group_each():
    a, b = _layer(4, True, 16), _layer(8, True, 48)
    qconfig = ct.quantization_config({"x.a": a, "x.b": b}, ["x.a", "x.b", "head"])
    targets = sorted(tuple(g.targets) for g in qconfig.config_groups.values())
    assert targets == [("x.a",), ("x.b",)] and qconfig.ignore == []
