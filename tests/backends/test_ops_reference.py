"""The plain-PyTorch references of surgery's custom ops: spec golden values (ops.md §10),
agreement with the attention swap's functional API, gradients, torch.export / torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.backends.ops import softmax as softmax_ops
from surgery.backends.ops import softplus_attention as spa
from surgery.backends.ops import stablemax as sm
from surgery.passes.attention import functional as AF


def test_stablemax_golden_values():
    x = torch.tensor([-1.0, 0.0, 2.0])
    expect = torch.tensor([0.5, 1.0, 3.0]) / 4.5
    torch.testing.assert_close(torch.ops.surgery.stablemax(x, -1), expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.ops.surgery.log_stablemax(x, -1), expect.log(),
                               rtol=1e-6, atol=1e-7)
    # StCE(label 2) = -log(2/3) and its gradient [0.055556, 0.222222, -0.111111] (spec §10)
    xx = x.clone().requires_grad_()
    loss = -torch.ops.surgery.log_stablemax(xx, -1)[2]
    loss.backward()
    assert loss.item() == pytest.approx(0.405465, abs=1e-6)
    torch.testing.assert_close(xx.grad, torch.tensor([0.055556, 0.222222, -0.111111]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_stablemax_matches_attention_functional(dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=g) * 4
    torch.testing.assert_close(sm.stablemax_reference(x, dim), AF.stablemax(x, dim))
    torch.testing.assert_close(sm.log_stablemax_reference(x, dim), AF.log_stablemax(x, dim))


@pytest.mark.parametrize("log", [False, True])
def test_stablemax_backward_is_the_autograd_gradient(log):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(4, 9, generator=g, dtype=torch.float64)
    fn = AF.log_stablemax if log else AF.stablemax
    fn(x, -1).backward(up)
    got = sm.stablemax_backward_reference(x.detach(), up, -1, log)
    torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)
    op = torch.ops.surgery.log_stablemax if log else torch.ops.surgery.stablemax
    assert torch.autograd.gradcheck(lambda t: op(t, -1), (x.detach().requires_grad_(),))


def test_stablemax_fully_masked_row_is_nan_like_softmax():
    x = torch.full((2, 4), float("-inf"))
    x[0] = torch.tensor([0.0, -float("inf"), 1.0, -1.0])
    y = torch.ops.surgery.stablemax(x, -1)
    assert y[0, 1] == 0 and torch.isnan(y[1]).all()
    assert torch.isnan(torch.softmax(x, -1)[1]).all()


def test_softmax_op_equals_torch_softmax_and_its_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    for alg in softmax_ops.ALGORITHMS:
        torch.testing.assert_close(torch.ops.surgery.softmax(x, -1, alg), torch.softmax(x, -1))
    assert torch.autograd.gradcheck(lambda t: torch.ops.surgery.softmax(t, -1, "online"), (x,))
    with pytest.raises(ValueError, match="unknown softmax algorithm"):
        torch.ops.surgery.softmax(x, -1, "three_pass")


def _qkv(b=2, h=4, hkv=2, lq=9, lk=9, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g).to(dtype),
            torch.randn(b, hkv, lk, d, generator=g).to(dtype),
            torch.randn(b, hkv, lk, d, generator=g).to(dtype))


def test_lssa_golden_first_row_and_row_sums():
    q, k, v = _qkv()
    out = spa.softplus_attention_reference(q, k, v)
    # query 1 sees only key 1: weight exactly 1 (spec §10)
    kv = k.repeat_interleave(2, 1)
    vv = v.repeat_interleave(2, 1)
    torch.testing.assert_close(out[:, :, 0], vv[:, :, 0])
    # rows sum to 1: attending over all-ones values gives ones (up to eps)
    ones = torch.ones_like(v)
    for p in (0.0, 15.0):
        o = spa.softplus_attention_reference(q, k, ones, power=p)
        torch.testing.assert_close(o, torch.ones_like(o), atol=1e-6, rtol=0)
    assert math.log(64) * math.log(8192) == pytest.approx(37.48, abs=0.01)
    del kv


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_softplus_attention_matches_attention_functional(reweight, masked):
    q, k, v = _qkv(lq=11, lk=11)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[1, :4] = False  # left padding in batch 1
    visible = spa.visibility(2, 11, 11, True, key_mask if masked else None, q.device)
    ours = spa.softplus_attention_reference(q, k, v, key_mask if masked else None, True,
                                            15.0 if reweight else 0.0)
    theirs = AF.softplus_attention(q, k, v, mask=visible, reweight=reweight, p=15.0)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_softplus_attention_fully_masked_rows_are_zero():
    q, k, v = _qkv(b=1, lq=5, lk=5)
    key_mask = torch.zeros(1, 5, dtype=torch.bool)
    key_mask[0, 3:] = True  # queries 0..2 see no key at all
    for p in (0.0, 15.0):
        out = spa.softplus_attention_reference(q, k, v, key_mask, True, p)
        assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
        assert out[0, :, 3:].abs().sum() > 0


def test_lssar_handles_long_concentrated_rows_without_overflow():
    # (N A - 1)^15 overflows fp32 past N ~ 370 (spec §2.3); the max-normalised form does not
    q, k, v = _qkv(b=1, h=1, hkv=1, lq=600, lk=600, d=16)
    k[..., 100, :] = q[..., -1, :] * 10  # one key aligned with the last query
    out = spa.softplus_attention_reference(q, k, v, power=15.0)
    assert torch.isfinite(out).all()


def test_softplus_attention_gradient_flows():
    q, k, v = _qkv(b=1, h=2, hkv=1, lq=4, lk=4, d=4, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch.ops.surgery.softplus_attention(a, b, c, None, True, 3.0, 1e-8, True),
        args)


def test_ops_export_and_compile():
    class M(torch.nn.Module):
        def forward(self, x, q, k, v):
            return (torch.ops.surgery.stablemax(x, -1), torch.ops.surgery.log_stablemax(x, 0),
                    torch.ops.surgery.softmax(x, -1, "online"),
                    torch.ops.surgery.softplus_attention(q, k, v, None, True, 15.0, 1e-8, True))

    x = torch.randn(3, 5)
    q, k, v = _qkv(b=1, lq=6, lk=6)
    ep = torch.export.export(M(), (x, q, k, v))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"surgery.stablemax.default", "surgery.softplus_attention.default"} <= targets
    for a, b in zip(ep.module()(x, q, k, v), M()(x, q, k, v)):
        torch.testing.assert_close(a, b)
    compiled = torch.compile(M(), backend="eager", fullgraph=True)
    for a, b in zip(compiled(x, q, k, v), M()(x, q, k, v)):
        torch.testing.assert_close(a, b)
