"""``QuantLinear`` <-> compressed-tensors ``pack-quantized`` tensors and ``quantization_config``.

What plain transformers (with the ``compressed-tensors`` package) and vLLM read for a weight-only
int layer ``P``::

    P.weight_packed      int32 (out, ceil(in * bits / 32)): codes in original column order,
                         offset to unsigned and packed densely by compressed-tensors' pack_to_int32
    P.weight_scale       (out, groups) scales (ours, float32, unchanged)
    P.weight_zero_point  asymmetric only: signed zero points packed along dim 0 (int32)
    P.weight_shape       int64 [out, in]
    P.bias               the layer's bias

compressed-tensors keeps codes and zero points signed (``[-2^(b-1), 2^(b-1) - 1]``,
``w = (q - z) * s``); our asymmetric codes are unsigned (``[0, 2^b - 1]``), so both codes and zero
points move down by ``2^(b-1)``. ``q - z`` is unchanged, hence the dequantised weights are
identical. Our symmetric int4 scales may be negative (ONNX Runtime's convention, formats.py);
``q * s`` is the same product either way.

GPTQ ``act_order`` without static groups stores its codes permuted (``perm``) so that groups are
contiguous in the permuted order. Per-channel layers are written in original column order (the
one scale per row does not care) and ``perm`` goes to the surgery-only extras so that
``surgery.load`` rebuilds the permuted storage exactly. Grouped ones would need ``g_idx``, which
compressed-tensors removed ("actorder=group has been removed"), so they have no form here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FORMAT = "pack-quantized"


def available() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def refusal(module: nn.Module) -> str | None:
    """Why ``module`` (a QuantLinear) has no compressed-tensors form, or None."""
    if module.perm is not None and module.scales.shape[1] > 1:
        return ("GPTQ act_order with grouped scales stores a column permutation (g_idx), which "
                "compressed-tensors no longer reads; quantize with gptq(act_order=true, "
                "static_groups=true) or per-channel scales for a transformers/vLLM-loadable output")
    if not available():
        return "the `compressed-tensors` package is not installed (pip install compressed-tensors)"
    return None


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def scheme_key(module: nn.Module) -> tuple:
    """Layers with the same key share one compressed-tensors config group."""
    grouped = module.scales.shape[1] > 1
    return (module.bits, module.symmetric, module.group if grouped else None)


def to_ct(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(compressed-tensors tensors, surgery-only extras) of a QuantLinear, local names."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    bits = module.bits
    codes = module.codes().to(torch.int32)
    extras = {}
    if module.perm is not None:  # per-channel only (refusal() sends grouped ones elsewhere)
        codes = torch.empty_like(codes).index_copy_(1, module.perm, codes)
        extras["perm"] = module.perm.detach().clone()
    if not module.symmetric:
        codes = codes - _offset(bits)
    out = {
        "weight_packed": pack_to_int32(codes.to(torch.int8), bits),
        "weight_scale": module.scales.detach().clone(),
        "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64),
    }
    if not module.symmetric:
        zp = (module.zeros.to(torch.int32) - _offset(bits)).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    if module.bias is not None:
        out["bias"] = module.bias.detach().clone()
    return out, extras


def from_ct(config: dict[str, Any], tensors: dict[str, torch.Tensor],
            extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our QuantLinear state dict (local names) from :func:`to_ct`'s output, bit for bit."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    from surgery import registry

    bits, sym = config["bits"], config["symmetric"]
    shape = torch.Size([config["out_features"], config["in_features"]])
    codes = unpack_from_int32(tensors["weight_packed"], bits, shape).to(torch.int32)
    zeros = None
    scales = tensors["weight_scale"]
    if not sym:
        codes = codes + _offset(bits)
        zp = unpack_from_int32(tensors["weight_zero_point"], bits,
                               torch.Size([shape[0], scales.shape[1]]), packed_dim=0)
        zeros = zp.to(torch.int32) + _offset(bits)
    perm = extras.get("perm")
    if perm is not None:
        codes = codes.index_select(1, perm)
    cls = registry.module_type("QuantLinear")
    dtype = getattr(torch, config.get("dtype", "float32"))
    layer = cls.from_codes(codes, scales, zeros, bits=bits, bias=tensors.get("bias"), perm=perm,
                           dtype=dtype)
    return layer.state_dict()


def quantization_config(layers: dict[str, nn.Module], all_linear: list[str]) -> Any:
    """compressed-tensors' QuantizationConfig for the QuantLinear ``layers`` (path -> module).

    One scheme for every layer: ``targets=["Linear"]`` minus the float Linears (``ignore``), as
    llm-compressor writes it. Several schemes: one config group each, naming its layers.
    """
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme)

    groups: dict[tuple, list[str]] = {}
    for path, m in sorted(layers.items()):
        groups.setdefault(scheme_key(m), []).append(path)
    single = len(groups) == 1
    config_groups = {}
    for i, ((bits, sym, group), paths) in enumerate(sorted(groups.items(), key=lambda kv: kv[1])):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="group" if group else "channel", group_size=group,
                                dynamic=False)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if single else paths, weights=args, format=FORMAT)
    ignore = sorted(set(all_linear) - set(layers)) if single else []
    return QuantizationConfig(config_groups=config_groups, format=FORMAT,
                              quantization_status="compressed", ignore=ignore)


def write_config(directory: Path, qconfig: Any) -> None:
    """Add ``quantization_config`` to ``directory/config.json`` the way llm-compressor does.

    Plus ``dequantize: true``: transformers then decompresses every layer while loading (the
    other path decompresses on the first forward, so memory ends up the same). Its other path
    cannot load asymmetric layers: it sizes ``weight_zero_point`` unpacked while the format
    (and compressed-tensors' own compressor) packs it (transformers 5.24, compressed-tensors
    0.20.1: "size mismatch ... weight_zero_point"). vLLM does not read the key.
    """
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=qconfig).update_config(str(directory))
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["dequantize"] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
