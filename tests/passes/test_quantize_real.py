"""Quality of quantization on the real SmolLM2-135M (slow: run with -m slow)."""

import copy

import pytest
import torch
import torch.nn as nn

from surgery.data import corpus
from surgery.evaluate import perplexity
from surgery.models import load_model
from surgery.passapi import RunContext
from surgery.progress import Progress
from surgery.registry import get_pass

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    lm = load_model("zoo:smollm2-135m")
    evalset = corpus(lm.tokenizer, "pydoc", samples=1, seqlen=512, seed=0, eval_windows=16)
    calib = corpus(lm.tokenizer, "pydoc", samples=64, seqlen=256, seed=0, name="calib")
    base = perplexity(lm.model, evalset.evaluation)
    return lm, evalset, calib, base


def quantized_ppl(setup, method, **kw):
    lm, evalset, calib, _ = setup
    model = copy.deepcopy(lm.model).eval()
    mods = {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
    assert len(mods) == 210
    P = get_pass("quantize", method)
    P(P.Params(**kw)).run(RunContext(model=model, models={}, data={"calib": calib},
                                       progress=Progress()), mods)
    return perplexity(model, evalset.evaluation)


def test_int8_per_channel_within_one_percent(setup):
    ppl = quantized_ppl(setup, "rtn", format="int8")
    assert ppl <= 1.01 * setup[3]


# Same protocol as benchmarks/quantize.py (docs/bench/quantize.md). Plain GPTQ g64 without clip
# search or act_order measured 1.158x there, so the target is asserted on these two variants.
@pytest.mark.parametrize("variant", [{"clip": True}, {"act_order": True}], ids=["clip", "act_order"])
def test_int4_gptq_g64_beats_rtn_and_stays_within_15_percent(setup, variant):
    rtn = quantized_ppl(setup, "rtn", format="int4", group=64)
    gptq = quantized_ppl(setup, "gptq", format="int4", group=64, data="calib", **variant)
    base = setup[3]
    assert gptq <= 1.15 * base
    assert gptq < rtn - 0.5 * (rtn - base)  # closes at least half of RTN's gap
