"""Quantizing a pruned module keeps the pruned weights at exactly zero (issue: masks are state)."""

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.data import Dataset
from surgery.passapi import NM, Percent, RunContext
from surgery.passes.prune import SparseLinear
from surgery.progress import Progress
from surgery.registry import get_pass


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def ctx(model):
    g = torch.Generator().manual_seed(1)
    ds = Dataset("calib", torch.randint(0, 256, (8, 32), generator=g),
                 torch.randint(0, 256, (2, 32), generator=g))
    return RunContext(model=model, models={}, data={"calib": ds}, progress=Progress())


def linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers")}


@pytest.mark.parametrize("quant", [
    ("rtn", {"format": "int4", "group": 32}),
    ("rtn", {"format": "int8"}),
    ("gptq", {"format": "int4", "group": 32, "data": "calib"}),
])
@pytest.mark.parametrize("sparsity", [NM(n=2, m=4), Percent(value=60)])
def test_quantizing_a_pruned_module_keeps_zeros(quant, sparsity):
    Q = get_pass("quantize", quant[0])
    assert Q is not None, "the quantize family ships with surgery"
    model = tiny()
    P = get_pass("prune", "wanda")
    P(P.Params(sparsity=sparsity, data="calib")).run(ctx(model), linears(model))
    masks = {p: m.weight_mask.clone() for p, m in linears(model).items()}
    assert all(isinstance(m, SparseLinear) for m in linears(model).values())
    Q(Q.Params(**quant[1])).run(ctx(model), linears(model))
    for path, keep in masks.items():
        q = model.get_submodule(path)
        w = q.dequantized_weight()
        assert (w[~keep] == 0).all(), f"{path}: {int((w[~keep] != 0).sum())} pruned weights revived"
