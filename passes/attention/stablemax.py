"""`swap softmax in SEL for stablemax` (Prieto et al. 2025, ops.md §1)."""

from __future__ import annotations

from surgery.registry import register

from .common import SwapParams, SwapPass
from .intercept import NormaliserSpec


@register
class SwapStableMax(SwapPass):
    method = "stablemax"
    summary = "replace the attention softmax by StableMax (s(x)=x+1 / 1/(1-x), l1-normalised)"

    class Params(SwapParams):
        pass

    def spec(self) -> NormaliserSpec:
        return NormaliserSpec(kind="stablemax")
