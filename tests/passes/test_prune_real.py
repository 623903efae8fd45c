"""Quality on the real SmolLM2-135M (slow): the issue's ordering and thresholds.

Every Linear in the decoder blocks is pruned; calibration on pydoc windows (seed 0): 16 x 256
tokens for the 2:4 ordering, 128 x 512 tokens (the issue-4 measurements) for the SparseGPT 50%
bound and DSnoT; evaluation on 4096 disjoint pydoc tokens (seqlen 512). benchmarks/prune.py
measures the same with timings (docs/bench/prune.md). On the loaded 2-core CPU each 128 x 512 run
takes 10-20 minutes.
"""

import copy

import pytest
import torch
import torch.nn as nn

from surgery.passapi import NM, Percent, RunContext
from surgery.progress import Progress
from surgery.registry import get_pass

pytestmark = pytest.mark.slow

SMALL = (16, 256)  # calibration samples x seqlen
ISSUE4 = (128, 512)


@pytest.fixture(scope="module")
def setup():
    from surgery.data import corpus
    from surgery.evaluate import perplexity
    from surgery.models import load_model

    torch.manual_seed(0)
    lm = load_model("zoo:smollm2-135m")
    calibs = {}
    ev = corpus(lm.tokenizer, "pydoc", samples=1, seqlen=512, seed=0, eval_windows=8).evaluation
    assert ev.numel() >= 4096
    cache = {"dense": perplexity(lm.model, ev)}

    def ppl(method, sparsity, calib=SMALL, **kw):
        key = (method, str(sparsity), calib, repr(kw))
        if key not in cache:
            if calib not in calibs:
                calibs[calib] = corpus(lm.tokenizer, "pydoc", samples=calib[0], seqlen=calib[1],
                                       seed=0, name="calib")
            model = copy.deepcopy(lm.model)
            P = get_pass("prune", method)
            targets = {n: m for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
            P(P.Params(sparsity=sparsity, **kw)).apply(
                RunContext(model=model, models={}, data={"calib": calibs[calib]},
                           progress=Progress()), targets)
            cache[key] = perplexity(model, ev)
        return cache[key]

    return cache, ppl


def test_nm_quality_ordering(setup):
    cache, ppl = setup
    sgpt = ppl("sparsegpt", NM(n=2, m=4), data="calib")
    wanda = ppl("wanda", NM(n=2, m=4), data="calib")
    mag = ppl("magnitude", NM(n=2, m=4))
    assert sgpt < wanda < mag


# Strict: the day SparseGPT 50% reaches the issue's 1.4x bound this XPASSes and fails, so the
# docs and this marker get updated instead of the improvement going unnoticed.
@pytest.mark.xfail(strict=True, reason="measured 14.86 vs dense 9.82 (1.51x) with 128x512 pydoc "
                   "calibration tokens, 15.18 (1.55x) with the reference's 128x2048 and 15.79 "
                   "(1.61x) with 16x256 (docs/bench/prune.md); the implementation matches the "
                   "reference (tested): the issue's 1.4x bound does not hold for SmolLM2-135M")
def test_sparsegpt_50_percent_within_1_4x_dense(setup):
    cache, ppl = setup
    assert ppl("sparsegpt", Percent(value=50), ISSUE4, data="calib") <= 1.4 * cache["dense"]


def test_dsnot_on_every_layer_improves_wanda_60_percent(setup):
    # measured with 128x512: 45.42 -> 42.46 (16x256: 46.70 -> 44.57), docs/bench/prune.md
    cache, ppl = setup
    plain = ppl("wanda", Percent(value=60), ISSUE4, data="calib")
    refined = ppl("wanda", Percent(value=60), ISSUE4, data="calib",
                  refine={"skip_layer": "none"})
    assert refined < plain


# DSnoT with the reference default skip_layer="mlp" (attention layers only) is neutral on
# SmolLM2-135M (45.42 -> 45.43 with 128x512 tokens, 46.70 -> 48.15 with 16x256;
# docs/bench/prune.md). There is no bound to assert in either direction, so it has no test; the
# test above asserts what does hold (refining every layer improves Wanda).
