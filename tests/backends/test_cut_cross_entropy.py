"""Cut Cross-Entropy (backends/ops/cross_entropy.py) against F.cross_entropy on full logits:
forward within 1e-5 relative and gradients within 1e-4 in fp32, on irregular shapes (tiles that
do not divide the sizes) with ignored labels. The Triton kernels are checked in the interpreter
in test_triton_kernels.py."""

import pytest
import torch
import torch.nn.functional as F

from surgery.backends.ops import cross_entropy as ce


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(ce, "TOKEN_BLOCK", 7)
    monkeypatch.setattr(ce, "VOCAB_BLOCK", 13)


def _problem(n=37, d=24, v=101, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100  # ignored positions
    return h, w, y


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(37, 24, 101), (5, 8, 7), (64, 16, 13)])
def test_matches_full_logits_in_fp32(small_tiles, reduction, shape):
    h, w, y = _problem(*shape, scale=3.0)
    got = ce.cut_cross_entropy(h, w, y, reduction=reduction)
    ref = F.cross_entropy(h @ w.T, y, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(ref) if reduction == "none" else torch.ones_like(ref)
    gh, gw = _grads((got * upstream).sum(), h, w)
    rh, rw = _grads((ref * upstream).sum(), h, w)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_exact_in_float64(small_tiles):
    h, w, y = _problem(dtype=torch.float64)
    got, ref = ce.cut_cross_entropy(h, w, y), F.cross_entropy(h @ w.T, y)
    assert abs(float((got - ref).detach())) < 1e-12
    for a, b in zip(_grads(got, h, w), _grads(ref, h, w)):
        assert (a - b).abs().max() < 1e-13


def test_batched_hidden_and_all_ignored(small_tiles):
    h, w, y = _problem(n=24)
    got = ce.cut_cross_entropy(h.view(2, 12, -1), w, y.view(2, 12), reduction="none")
    assert got.shape == (2, 12)
    assert (got.view(-1)[::5] == 0).all()  # ignored positions contribute nothing
    none = torch.full_like(y, -100)
    assert torch.isnan(ce.cut_cross_entropy(h, w, none)) and \
        torch.isnan(F.cross_entropy(h @ w.T, none))  # same convention as PyTorch


def test_gradient_filtering_skips_negligible_tiles_only(small_tiles, monkeypatch):
    h, w, y = _problem(n=40, v=130, scale=4.0)
    exact = _grads(ce.cut_cross_entropy(h, w, y, filter_eps=None), h, w)
    seen = []
    real = ce.backward_reference

    def counting(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ce, "backward_reference", counting)
    filtered = _grads(ce.cut_cross_entropy(h, w, y, filter_eps=2.0 ** -12), h, w)
    assert seen == [2.0 ** -12]  # the threshold reached the backward
    for a, b in zip(filtered, exact):  # skipped tiles held only |G| < eps
        assert (a - b).abs().max() <= 2.0 ** -12 * 13 * (h.abs().max() + w.abs().max())
    assert ce.default_filter_eps(torch.bfloat16) == 2.0 ** -12
    assert ce.default_filter_eps(torch.float32) is None


def test_never_holds_more_than_one_tile_of_logits(monkeypatch):
    """The largest matrix product the CPU path makes is one (token block x vocab block) tile."""
    monkeypatch.setattr(ce, "TOKEN_BLOCK", 16)
    monkeypatch.setattr(ce, "VOCAB_BLOCK", 32)
    h, w, y = _problem(n=100, v=300)
    biggest = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    loss = ce.cut_cross_entropy(h, w, y)
    loss.backward()
    monkeypatch.undo()
    assert max(biggest) <= max(16 * 32, 32 * 24, 16 * 24)


def test_bad_reduction():
    h, w, y = _problem()
    with pytest.raises(ValueError, match="reduction"):
        ce.cut_cross_entropy(h, w, y, reduction="avg")
