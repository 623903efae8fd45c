"""StableMax, log-StableMax, StableMax cross-entropy and perpGrad: spec golden values (ops.md §1, §10)."""

import math

import pytest
import torch

from surgery.passes.attention.functional import log_s, log_stablemax, s, stablemax
from surgery.passes.attention.training import OrthoGrad, orthogonal_grad, stablemax_cross_entropy


def test_stablemax_golden_values():
    out = stablemax(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64))
    assert torch.allclose(out, torch.tensor([1 / 9, 2 / 9, 2 / 3], dtype=torch.float64), atol=1e-15)


def test_element_map_properties():
    x = torch.tensor([-1e30, -3.0, -1e-7, 0.0, 1e-7, 5.0, 1e30])
    sx = s(x)
    assert (sx > 0).all() and sx[3] == 1.0
    assert torch.allclose(sx[1], torch.tensor(0.25)) and sx[5] == 6.0
    assert torch.isfinite(sx).all()
    assert s(torch.tensor(-float("inf"))) == 0.0  # -inf acts as masking
    # C1 at 0: both one-sided derivatives are 1
    z = torch.tensor([-1e-6, 1e-6], dtype=torch.float64, requires_grad=True)
    s(z).sum().backward()
    assert torch.allclose(z.grad, torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_log_stablemax_matches_log_of_ratio():
    x = torch.randn(5, 17, dtype=torch.float64) * 30
    ref = torch.log(s(x) / s(x).sum(-1, keepdim=True))
    assert torch.allclose(log_stablemax(x), ref, atol=1e-12)
    assert torch.allclose(log_s(x), torch.log(s(x)), atol=1e-12)


def test_stablemax_not_shift_invariant():
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert not torch.allclose(stablemax(x), stablemax(x - 2.0))


def test_stablemax_ce_golden_value_and_gradient():
    x = torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    loss = stablemax_cross_entropy(x, torch.tensor([2]))
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach()) - (-math.log(2 / 3))) < 1e-12
    assert abs(float(loss.detach()) - 0.405465) < 1e-6
    loss.backward()
    assert torch.allclose(x.grad, torch.tensor([[0.0555556, 0.2222222, -0.1111111]], dtype=torch.float64), atol=1e-6)


def test_stablemax_ce_analytic_gradient_random():
    torch.manual_seed(0)
    x = (torch.randn(6, 9, dtype=torch.float64) * 20).requires_grad_()
    y = torch.randint(0, 9, (6,))
    stablemax_cross_entropy(x, y).backward()
    xd = x.detach()
    big_s = s(xd).sum(-1, keepdim=True)
    ds = torch.where(xd < 0, 1 / (1 - xd) ** 2, torch.ones_like(xd))
    grad = ds / big_s
    grad[torch.arange(6), y] -= 1 / (1 + xd[torch.arange(6), y].abs())
    assert torch.allclose(x.grad, grad / 6, atol=1e-12)


def test_stablemax_ce_float32_input_returns_float32_and_stays_finite():
    x = torch.tensor([[1e30, -1e30, 0.0], [3e38, 0.0, -3e38]], requires_grad=True)
    loss = stablemax_cross_entropy(x, torch.tensor([0, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # the float32 path agrees with the float64 one on ordinary logits
    z = torch.randn(8, 10) * 5
    y = torch.randint(0, 10, (8,))
    a = stablemax_cross_entropy(z, y, dtype=torch.float32)
    b = stablemax_cross_entropy(z, y, keep_fp64=True)
    assert abs(float(a) - float(b)) < 1e-5


def test_stablemax_ce_reductions_and_errors():
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    per = stablemax_cross_entropy(x, y, reduction="none")
    assert per.shape == (4,)
    assert torch.allclose(per.mean(), stablemax_cross_entropy(x, y))
    assert torch.allclose(per.sum(), stablemax_cross_entropy(x, y, reduction="sum"))
    assert float(stablemax_cross_entropy(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(x, y, reduction="max")
    with pytest.raises(TypeError, match="integer"):
        stablemax_cross_entropy(x, y.float())


def test_orthogonal_grad_is_orthogonal_and_keeps_norm():
    torch.manual_seed(0)
    w, g = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    gp = orthogonal_grad(w, g)
    assert abs(float((gp * w).sum())) < 1e-10
    assert abs(float(gp.norm() - g.norm())) < 1e-10
    bare = orthogonal_grad(w, g, rescale=False)
    proj = (w * g).sum() / (w * w).sum()
    assert torch.allclose(bare, g - proj * w, atol=1e-12)


def test_orthograd_wraps_sgd_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    w0 = p.detach().clone()
    opt = OrthoGrad([p], torch.optim.SGD, lr=0.1)
    g = torch.randn(4, 3, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    assert torch.allclose(p.detach(), w0 - 0.1 * orthogonal_grad(w0, g), atol=1e-12)
    opt.zero_grad()
    assert p.grad is None
    # the base optimizer's hyper-parameters are visible in the wrapper's groups
    assert opt.param_groups[0]["lr"] == 0.1 and opt.base_optimizer.param_groups[0]["lr"] == 0.1


def test_orthograd_with_adamw_trains():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    opt = OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    x = torch.randn(64, 8)
    y = (x @ torch.randn(8, 3)).argmax(-1)  # a linearly separable task
    first = None
    for _ in range(100):
        loss = stablemax_cross_entropy(model(x), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.75 * first
