"""`quantize SEL to int8|int4 [using rtn(...) | gptq(...)]`: weight-only integer quantisation."""

from surgery.passes.quantize import gptq, rtn  # noqa: F401  (registers the passes)
from surgery.passes.quantize.qlinear import QuantLinear  # noqa: F401
