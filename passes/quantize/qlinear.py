"""``QuantLinear``: a Linear whose weight is stored as real integer codes (2 to 8 bits).

State (all buffers, so ``state_dict`` round-trips it exactly and safetensors saves it):

- ``qweight``: int8 ``(out, in)`` (int8 symmetric), uint8 ``(out, in)`` (int8 asymmetric) or
  uint8 ``(out, ceil(in/2))`` (int4, two codes per byte, see formats.py) or int32
  ``(out, ceil(in * bits / 32))`` (int2, int3, int5, int6, int7: one dense bit stream per row,
  codes offset to unsigned; backends/ops/quant.py ``pack_bits``),
- ``scales``: float32 ``(out, in // group)``,
- ``zeros``: uint8 ``(out, in // group)`` integer zero points (asymmetric only),
- ``bias``: ``(out,)`` (if the original Linear had one),
- ``perm``: int64 ``(in,)`` (GPTQ act_order without static groups only): the codes are stored in
  permuted column order so that groups stay contiguous; forward gathers ``x[..., perm]`` first.

Forward on CPU runs aten's packed weight-only kernels (backends/ops/quant_cpu.py) when the layer's
format, the activation dtype and the number of rows allow it: the kernel operands are built from
the buffers once per activation dtype, at the first forward, cached on the module (not buffers:
never saved, dropped on ``.to()`` and when a buffer changes), so the saved artifact is unchanged.
Otherwise (other devices, autograd through x, unsupported formats, many rows) forward calls the
``surgery::int8_linear`` / ``surgery::int4_linear`` / ``surgery::intn_linear`` custom ops (backends/ops/quant.py), whose CPU
implementation dequantises and runs ``F.linear`` (the reference); other backends register
kernels for the same ops. ``fast_path = False`` on a module (or the class) forces the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from surgery.backends.ops import quant as qops
from surgery.backends.ops import quant_cpu
from surgery.passes.quantize.formats import BITS, Format, pack_int4, unpack_int4
from surgery.registry import register_module_type


@register_module_type
class QuantLinear(nn.Module):
    fast_path: bool = True  # use the packed CPU kernels where they apply

    def __init__(self, in_features: int, out_features: int, *, bits: int, group: int,
                 symmetric: bool, bias: bool = True, permuted: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if in_features % group:
            raise ValueError(f"group {group} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group, self.symmetric = bits, group, symmetric
        self.dtype = dtype  # dtype of the float weights this layer replaced
        ng = in_features // group
        if bits == 8:
            qdtype = torch.int8 if symmetric else torch.uint8
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=qdtype,
                                                        device=device))
        elif bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2,
                                                        dtype=torch.uint8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features,
                                                        (in_features * bits + 31) // 32,
                                                        dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.float32,
                                                  device=device))
        if symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.uint8,
                                                      device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if permuted:
            self.register_buffer("perm", torch.arange(in_features, device=device))
        else:
            self.perm = None
        # activation dtype -> (buffer versions, packed operands or None if unsupported)
        self._packed: dict[torch.dtype, tuple[tuple, quant_cpu.Packed | None]] = {}

    @property
    def format(self) -> Format:
        return Format(self.bits, self.symmetric)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   *, bits: int, bias: torch.Tensor | None = None,
                   perm: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                   ) -> "QuantLinear":
        """Build from integer codes (out, in) (in stored column order) and (out, groups) params."""
        out, inp = codes.shape
        group = inp // scales.shape[1]
        m = cls(inp, out, bits=bits, group=group, symmetric=zeros is None,
                bias=bias is not None, permuted=perm is not None, dtype=dtype,
                device=codes.device)
        if bits == 8:
            m.qweight.copy_(codes.to(m.qweight.dtype))
        elif bits == 4:
            m.qweight.copy_(pack_int4(codes))
        else:
            unsigned = codes.to(torch.int32) + (1 << (bits - 1) if zeros is None else 0)
            m.qweight.copy_(qops.pack_bits(unsigned, bits))
        m.scales.copy_(scales.to(torch.float32))
        if zeros is not None:
            m.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            m.bias.copy_(bias.detach())
        if perm is not None:
            m.perm.copy_(perm)
        return m

    def surgery_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group": self.group, "symmetric": self.symmetric,
                "bias": self.bias is not None, "permuted": self.perm is not None,
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "QuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], bits=cfg["bits"], group=cfg["group"],
                   symmetric=cfg["symmetric"], bias=cfg["bias"], permuted=cfg["permuted"],
                   dtype=getattr(torch, cfg.get("dtype", "float32")))

    # --- views -------------------------------------------------------------------------------

    def codes(self) -> torch.Tensor:
        """Integer codes (out, in) in stored column order (qweight for int8, int8 for int4, int32
        for the bit-stream widths); signed for symmetric layers."""
        if self.bits == 8:
            return self.qweight
        if self.bits == 4:
            return unpack_int4(self.qweight, self.in_features, signed=self.symmetric)
        return qops.nbits_codes(self.qweight, self.in_features, self.bits, self.symmetric)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with, in the original column order."""
        w = qops.dequantize(self.codes(), self.scales, self.zeros)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # --- packed CPU kernels ----------------------------------------------------------------

    def fast_path_reason(self, dtype: torch.dtype = torch.bfloat16) -> str | None:
        """Why forward with ``dtype`` activations cannot use a packed kernel (None if it can)."""
        if self.bits not in (4, 8):
            return f"int{self.bits} (packed CPU kernels exist for int4 and int8 only)"
        if self.qweight.device.type != "cpu":
            return f"weights on {self.qweight.device.type} (packed kernels are CPU only)"
        return quant_cpu.unsupported_reason(self.bits, self.group, self.symmetric,
                                            self.in_features, self.out_features, dtype)

    def _state_key(self) -> tuple:
        # In-place writes (load_state_dict, edits) bump _version; assignment changes data_ptr.
        # Tensors made under inference_mode have no version counter (and cannot be edited
        # in place outside it).
        return tuple(None if t is None else
                     (-1 if t.is_inference() else t._version, t.data_ptr())
                     for t in (self.qweight, self.scales, self.zeros))

    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> quant_cpu.Packed | None:
        """Build (or reuse) the packed operands for ``dtype`` activations; None if unsupported.

        Forward does this itself at the first call; call it before ``torch.compile`` so that the
        compiled graph uses the kernels (packing never happens inside a graph).
        """
        key = self._state_key()
        hit = self._packed.get(dtype)
        if hit is not None and hit[0] == key:
            return hit[1]
        packed = None
        if self.fast_path_reason(dtype) is None:
            packed = quant_cpu.pack(self.bits, self.qweight, self.scales, self.zeros,
                                    self.in_features, self.group, dtype)
        self._packed[dtype] = (key, packed)
        return packed

    def _packed_for(self, x: torch.Tensor) -> quant_cpu.Packed | None:
        if (not self.fast_path or x.device.type != "cpu" or x.dtype not in quant_cpu.MAX_ROWS
                or self.bits not in quant_cpu.MAX_ROWS[x.dtype]):
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None  # the kernels have no backward; the reference op has
        if x.numel() > quant_cpu.MAX_ROWS[x.dtype][self.bits] * self.in_features:
            return None
        if torch.compiler.is_compiling():
            hit = self._packed.get(x.dtype)  # prepared before compiling, or reference
            return None if hit is None else hit[1]
        return self.prepare(x.dtype)

    def _apply(self, fn, recurse=True):
        self._packed = {}  # .to() / .cuda() / dtype casts: rebuild from the new buffers
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_packed"] = {}  # CPU-specific layout: never pickled
        return state

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        packed = self._packed_for(x)
        if packed is not None:
            return quant_cpu.packed_linear(x, packed, self.bias)
        if self.bits == 8:
            return torch.ops.surgery.int8_linear(x, self.qweight, self.scales, self.zeros,
                                                 self.bias)
        if self.bits == 4:
            return torch.ops.surgery.int4_linear(x, self.qweight, self.scales, self.zeros,
                                                 self.bias, self.in_features)
        return torch.ops.surgery.intn_linear(x, self.qweight, self.scales, self.zeros, self.bias,
                                             self.in_features, self.bits)

    def surgery_export_module(self, options) -> nn.Module:
        """The ONNX export layout of this layer (backends/onnx/export.py calls this; ``options``
        is its ExportOptions: int4 layout and accuracy level)."""
        from surgery.backends.onnx.quant_layout import export_module

        return export_module(self, options.int4, options.accuracy_level)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        g = "per-channel" if self.group == self.in_features else f"group={self.group}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} {kind}, {g}, bias={self.bias is not None}"
                + (", act_order" if self.perm is not None else ""))
