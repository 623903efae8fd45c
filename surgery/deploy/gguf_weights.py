"""One weight matrix as a GGUF tensor: our integer codes carried over where a GGML block type
means the same thing, otherwise requantised (by the `gguf` package) from our float weights.

GGML's 32-wide block types and ours (passes/quantize/formats.py):

- ``Q8_0``: ``w = q * d``, ``q`` int8, one fp16 ``d`` per 32 inputs. Our int8 symmetric codes
  (``scale = absmax / 127``) are the same ``q``.
- ``Q4_0``: ``w = (u - 8) * d``, ``u`` in ``[0, 15]``. Our symmetric int4 codes ``q`` in
  ``[-8, 7]`` are ``u = q + 8`` (both take ``d = extreme / -8``).
- ``Q4_1``: ``w = u * d + m``. Our asymmetric int4 ``w = (u - z) * s`` is ``d = s``, ``m = -z * s``.

A group of ``g`` inputs (``g`` a multiple of 32, per-channel included) is ``g / 32`` blocks with
the same scale, so the codes are carried exactly; the only change is ``d`` (and ``m``) rounded to
fp16, which GGML stores. GPTQ ``act_order`` layers keep their codes in a permuted column order
that blocks cannot express: they are requantised like float weights. Every tensor's added error
(against the weights our model computes with) is measured by dequantising what was written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32  # inputs per block of Q8_0 / Q4_0 / Q4_1

# our type names -> GGML quantization types (names of gguf.GGMLQuantizationType)
TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
         "q4_1": "Q4_1"}
FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass
class Weight:
    """A weight matrix (out, in) as our model holds it: float, or integer codes + scales."""

    float_weight: torch.Tensor | None = None  # (out, in) float
    codes: torch.Tensor | None = None  # (out, in) integer codes, stored column order
    scales: torch.Tensor | None = None  # (out, groups) float32
    zeros: torch.Tensor | None = None  # (out, groups) or None (symmetric)
    bits: int = 0
    permuted: bool = False  # codes in a permuted column order (GPTQ act_order)
    dequantized: torch.Tensor | None = None  # (out, in) float32, original column order

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def reference(self) -> torch.Tensor:
        """The float32 weight our model computes with."""
        w = self.dequantized if self.quantized else self.float_weight
        return w.detach().to(torch.float32)

    def rows(self, index: torch.Tensor) -> "Weight":
        """The same weight with its output rows reordered (llama.cpp's q/k rope layout)."""
        pick = (lambda t: None if t is None else t.index_select(0, index))
        return Weight(pick(self.float_weight), pick(self.codes), pick(self.scales),
                      pick(self.zeros), self.bits, self.permuted, pick(self.dequantized))


@dataclass
class Encoded:
    data: np.ndarray  # float array, or uint8 bytes for block types
    ggml_type: str  # name of a gguf.GGMLQuantizationType
    how: str  # "carried" (our codes), "requantized", "float" or "fallback" (not block-aligned)
    rel_error: float  # ||W_gguf - W_ours||_F / ||W_ours||_F
    max_abs_error: float


def exact_type(w: Weight) -> str | None:
    """The GGML type whose blocks hold ``w``'s codes unchanged, or None."""
    if not w.quantized or w.permuted:
        return None
    out, inp = w.codes.shape
    group = inp // w.scales.shape[1]
    if group % BLOCK:
        return None
    if w.bits == 8:
        return "q8_0" if w.zeros is None else None  # GGML has no stored asymmetric 8-bit type
    if w.bits == 4:
        return "q4_0" if w.zeros is None else "q4_1"
    return None


def encode(w: Weight, want: str) -> Encoded:
    """``w`` as GGML type ``want`` (a key of TYPES); ``want == "auto"`` keeps quantized layers in
    their exact type (else the GGML type of the same bit width) and float ones in f16."""
    import gguf

    exact = exact_type(w)
    if want == "auto":
        want = exact or ("q8_0" if w.bits == 8 else "q4_1" if w.zeros is not None and w.bits == 4
                         else "q4_0" if w.bits == 4 else "f16")
    ref = w.reference()
    qtype = gguf.GGMLQuantizationType[TYPES[want]]
    how = "float"
    if want not in FLOAT_TYPES and ref.shape[1] % BLOCK:
        want, qtype, how = "f16", gguf.GGMLQuantizationType.F16, "fallback"
    if exact is not None and exact == want:
        data, how = _carry(w, want), "carried"
    elif want in FLOAT_TYPES:
        data = gguf.quants.quantize(ref.numpy(), qtype)
    else:
        data, how = gguf.quants.quantize(ref.numpy(), qtype), "requantized"
    back = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    back = back.reshape(ref.shape)
    err = (back - ref)
    norm = float(ref.norm())
    return Encoded(data, qtype.name, how, float(err.norm()) / max(norm, 1e-30),
                   float(err.abs().max()) if err.numel() else 0.0)


def _carry(w: Weight, kind: str) -> np.ndarray:
    """GGML blocks from our codes: (out, in / 32 * bytes_per_block) uint8."""
    out, inp = w.codes.shape
    rep = inp // w.scales.shape[1] // BLOCK
    nb = inp // BLOCK
    d = w.scales.to(torch.float32).repeat_interleave(rep, 1).numpy()  # (out, nb)
    q = w.codes.to(torch.int32).reshape(out, nb, BLOCK).numpy()
    d16 = d.astype(np.float16).view(np.uint8).reshape(out, nb, 2)
    if kind == "q8_0":
        qs = q.astype(np.int8).view(np.uint8)
        return np.concatenate([d16, qs], axis=-1).reshape(out, -1)
    u = (q + 8 if kind == "q4_0" else q).astype(np.uint8)
    # a block's 16 bytes: element j in the low nibble, element j + 16 in the high one
    qs = u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << np.uint8(4))
    if kind == "q4_0":
        return np.concatenate([d16, qs], axis=-1).reshape(out, -1)
    z = w.zeros.to(torch.float32).repeat_interleave(rep, 1).numpy()
    m16 = (-z * d).astype(np.float16).view(np.uint8).reshape(out, nb, 2)
    return np.concatenate([d16, m16, qs], axis=-1).reshape(out, -1)
