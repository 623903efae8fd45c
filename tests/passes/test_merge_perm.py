"""Permutation groups from torch.fx, weight matching and activation matching."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.passes.merge.matching import activation_matching, weight_matching
from surgery.passes.merge.permspec import (PermSpecError, derive_spec, invert_perm, permute_model,
                                           random_perms)

sys.path.insert(0, str(Path(__file__).parent))
from merge_nets import ResCNN, mlp  # noqa: E402

D = torch.float64


def randomize_bn(m):
    g = torch.Generator().manual_seed(7)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.num_features, generator=g))
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g))
    return m


def nets():
    torch.manual_seed(0)
    yield "mlp", mlp().double().eval(), torch.randn(5, 64, dtype=D)
    yield "mlp_ln", mlp(layernorm=True).double().eval(), torch.randn(5, 64, dtype=D)
    yield "rescnn", randomize_bn(ResCNN().double().eval()), torch.randn(4, 1, 8, 8, dtype=D)


@pytest.mark.parametrize("name,net,x", list(nets()), ids=lambda v: v if isinstance(v, str) else "")
def test_random_permutation_of_every_group_keeps_outputs(name, net, x):
    spec = derive_spec(net, (x,))
    assert spec.groups
    ref = net(x)
    for seed in range(3):
        m = copy.deepcopy(net)
        permute_model(m, spec, random_perms(spec, torch.Generator().manual_seed(seed)))
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)
        assert not torch.equal(m.state_dict()[spec.groups[0].state[0][0]],
                               net.state_dict()[spec.groups[0].state[0][0]])


def test_rescnn_groups_follow_residual_streams():
    net = ResCNN()
    spec = derive_spec(net, (torch.randn(2, 1, 8, 8),))
    keys = [g.key for g in spec.groups]
    assert keys == ["c1.weight:0", "c3.weight:0"]  # one group per residual stream
    stream1 = set(spec.groups[0].state)
    assert {("c2.weight", 0), ("c2.weight", 1), ("b2.running_var", 0), ("sc.weight", 1),
            ("c3.weight", 1)} <= stream1
    stream2 = set(spec.groups[1].state)
    assert {("sc.weight", 0), ("c4.weight", 1), ("fc.weight", 1)} <= stream2
    assert ("fc.weight", 0) not in stream2  # the output axis is never permuted


def test_llama_mlp_blocks_are_permuted_attention_left_alone():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64)).eval()
    spec = derive_spec(lm)
    assert [g.size for g in spec.groups] == [64, 64]
    assert "attention" in spec.notes[0] and "unpermuted" in spec.notes[0]
    ids = torch.randint(0, 64, (2, 7))
    ref = lm(ids).logits
    permute_model(lm, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(lm(ids).logits, ref, atol=1e-5, rtol=0)


def test_unsupported_ops_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=-1))

    with pytest.raises(PermSpecError, match="cumsum"):
        derive_spec(Odd())
    with pytest.raises(PermSpecError, match="grouped convolution `0`"):
        derive_spec(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 2, 1)),
                    (torch.randn(1, 4, 5, 5),))


def test_flatten_of_spatial_axes_blocks_the_channel_group():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 1, 8, 8)
    spec = derive_spec(net, (x,))
    assert spec.groups == []  # conv channels are mixed into the flattened axis: not permutable


@pytest.mark.parametrize("name,net,x", list(nets()), ids=lambda v: v if isinstance(v, str) else "")
def test_weight_matching_recovers_a_random_permutation(name, net, x):
    spec = derive_spec(net, (x,))
    b = copy.deepcopy(net)
    Q = random_perms(spec, torch.Generator().manual_seed(11))
    permute_model(b, spec, Q)
    P, _ = weight_matching(spec, net.state_dict(), b.state_dict())
    for gi in Q:
        assert torch.equal(P[gi], invert_perm(Q[gi]))


def test_activation_matching_recovers_a_random_permutation():
    torch.manual_seed(0)
    net = mlp().eval()
    b = copy.deepcopy(net)
    spec = derive_spec(net)
    Q = random_perms(spec, torch.Generator().manual_seed(5))
    permute_model(b, spec, Q)
    batches = [torch.randn(32, 64) for _ in range(3)]
    for sim in ("neg_l2", "inner", "pearson"):
        P, C = activation_matching(spec, net, b, batches, similarity=sim)
        for gi in Q:
            assert torch.equal(P[gi], invert_perm(Q[gi])), sim
            assert C[gi].shape == (64, 64)


def test_weight_matching_improves_alignment_of_different_seeds():
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    spec = derive_spec(a)
    P, C = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0)
    ident = {gi: torch.arange(g.size) for gi, g in enumerate(spec.groups)}
    from surgery.passes.merge.permspec import apply_perm
    d0 = sum((a.state_dict()[k] - v).norm() for k, v in apply_perm(spec, ident, b.state_dict()).items())
    d1 = sum((a.state_dict()[k] - v).norm() for k, v in apply_perm(spec, P, b.state_dict()).items())
    assert d1 < 0.95 * d0
