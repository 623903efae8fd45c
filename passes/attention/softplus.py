"""`swap softmax in SEL for softplus(reweight=, p=, ...)`: LSSA / LSSAR (Gao & Spratling, ops.md §2)."""

from __future__ import annotations

from pydantic import field_validator, model_validator

from surgery.registry import register

from .common import SwapParams, SwapPass
from .intercept import NormaliserSpec

DEFAULT_P = 15.0


@register
class SwapSoftplus(SwapPass):
    method = "softplus"
    summary = "replace the attention softmax by length-scaled softplus attention (LSSA; LSSAR with reweight)"

    class Params(SwapParams):
        reweight: bool = False  # LSSAR: sharpen the LSSA weights with relu(N*A - O)^p
        p: float | None = None  # re-weighting power (default 15); only with reweight=true
        eps: float = 1e-8  # added to every row sum before dividing
        offset_rows: int = 3  # rows seeing at most this many keys use offset O = 0
        fallback_on_empty: bool = True  # a row with nothing above average keeps its LSSA weights
        reweight_at_train: bool = True  # false: re-weight only in eval mode (fine-tuning-free variant)

        @field_validator("p")
        @classmethod
        def _p_range(cls, v: float | None) -> float | None:
            if v is not None and not 1.0 <= v <= 64.0:
                raise ValueError("p must be between 1 and 64")
            return v

        @field_validator("eps")
        @classmethod
        def _eps_range(cls, v: float) -> float:
            if not 0.0 < v <= 1e-3:
                raise ValueError("eps must be > 0 and <= 1e-3")
            return v

        @field_validator("offset_rows")
        @classmethod
        def _offset_range(cls, v: int) -> int:
            if v < 0:
                raise ValueError("offset_rows must be >= 0")
            return v

        @model_validator(mode="after")
        def _reweight_only(self):
            if not self.reweight:
                if self.p is not None:
                    raise ValueError("p applies only with reweight=true")
                if not self.reweight_at_train:
                    raise ValueError("reweight_at_train applies only with reweight=true")
            return self

    def spec(self) -> NormaliserSpec:
        prm = self.params
        return NormaliserSpec(kind="softplus", reweight=prm.reweight, p=prm.p if prm.p is not None else DEFAULT_P,
                              eps=prm.eps, offset_rows=prm.offset_rows, fallback_on_empty=prm.fallback_on_empty,
                              reweight_at_train=prm.reweight_at_train)
