"""One tied-tensor rule (surgery/tying.py) and one per-name seeding rule (surgery/seeding.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from surgery.seeding import name_generator, name_seed
from surgery.tying import tied_groups, tied_names


def test_tied_embeddings_found_in_parameters_and_in_the_state_dict(tiny_llama):
    expected = {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_names(tiny_llama.named_parameters(remove_duplicate=False)) == expected
    # state_dict detaches every entry into a new tensor object: found by shared memory
    assert tied_names(tiny_llama.state_dict()) == expected


def test_views_with_another_layout_or_dtype_are_not_tied():
    base = torch.arange(16.0).reshape(4, 4)
    state = {"w": base, "same": base.view(4, 4), "t": base.t(), "flat": base.view(16),
             "bytes": base.view(torch.int32)}
    assert tied_groups(state) == [["w", "same"]]


def test_meta_and_empty_tensors_are_tied_only_when_identical():
    m1, m2 = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    e1, e2 = torch.empty(0), torch.empty(0)
    assert tied_names([("a", m1), ("b", m2), ("c", m1), ("d", e1), ("e", e2)]) == {"c": "a"}


def test_shared_module_recorded_once_per_group():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    assert tied_groups(net.named_parameters(remove_duplicate=False)) == [
        ["0.weight", "2.weight"], ["0.bias", "2.bias"]]


def test_name_seed_is_the_formula_merges_and_adapters_always_used():
    # pinned values: (seed * 1_000_003 + crc32(key)) % 2**63, key parts joined with ':'
    assert name_seed(3, 1, "model.w") == 1016716596
    assert name_seed(7, "model.layers.0.q_proj") == 4037871788


def test_merge_and_adapter_seeds_come_from_the_one_rule():
    from surgery.passes.adapters.common import generator_for
    from surgery.passes.merge.common import tensor_seed

    assert tensor_seed(3, "model.w", 1) == name_seed(3, 1, "model.w")
    a = torch.randn(5, generator=generator_for(7, "model.layers.0.q_proj"))
    b = torch.randn(5, generator=name_generator(7, "model.layers.0.q_proj"))
    assert torch.equal(a, b)
