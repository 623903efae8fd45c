"""N:M sparse training schedules (ops.md §7.1): MDGF, SDGF, SR-STE and finalisation."""

import math

import pytest
import torch
import torch.nn as nn

from surgery.passapi import NM, CallValue, RunContext
from surgery.passes.prune import SparseLinear, finalize_sparse_training, set_training_step
from surgery.passes.prune.masks import is_nm, nm_keep
from surgery.passes.prune.training import TrainingConfig, phase_at, sdgf_patterns
from surgery.progress import Progress
from surgery.registry import get_pass


def prepared(training: dict, n=1, m=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    P = get_pass("prune", "magnitude")
    method = training.pop("method")
    p = P(P.Params(sparsity=NM(n=n, m=m), training=CallValue(name=method, kwargs=training)))
    report = p.run(RunContext(model=model, models={}, data={}, progress=Progress()),
                     {"0": model[0]}).report
    assert "sparse training" in report.notes[0]
    return model, model[0]


def test_sdgf_patterns_match_the_spec():
    assert sdgf_patterns("sparsify", 1, 8) == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert sdgf_patterns("sparsify", 2, 16) == [(15, 16), (8, 16), (4, 16), (2, 16)]
    assert sdgf_patterns("fine", 1, 8) == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert sdgf_patterns("densify", 1, 8) == [(1, 64), (1, 32), (1, 16), (1, 8)]


def test_phases():
    cfg = TrainingConfig(method="sdgf", total_steps=100, dense_steps=20, fine_tune_steps=20)
    # sparse phase of 60 steps in 4 frames of 15, starting at step 20
    got = [(phase_at(cfg, 1, 8, t).kind, phase_at(cfg, 1, 8, t).n) for t in (0, 19, 20, 34, 35,
                                                                              50, 65, 79, 80, 99)]
    assert got == [("dense", 0), ("dense", 0), ("binary", 7), ("binary", 7), ("binary", 4),
                   ("binary", 2), ("binary", 1), ("binary", 1), ("binary", 1), ("binary", 1)]
    mdgf = TrainingConfig(method="mdgf", decay="exp", decay_coef=0.1, dense_steps=5)
    assert phase_at(mdgf, 1, 8, 15).beta == pytest.approx(math.exp(-1.0))
    lin = TrainingConfig(method="mdgf", decay="linear", decay_coef=0.1)
    assert phase_at(lin, 1, 8, 5).beta == pytest.approx(0.5)
    assert phase_at(lin, 1, 8, 50).beta == 0.0


def test_prune_with_training_keeps_dense_weights():
    torch.manual_seed(0)
    ref = nn.Linear(64, 16).weight.detach().clone()
    model, mod = prepared({"method": "mdgf", "decay_coef": 0.5})
    assert isinstance(mod, SparseLinear) and mod.training_config.method == "mdgf"
    assert torch.equal(mod.weight.detach(), ref)  # nothing zeroed yet
    assert is_nm(mod.weight_mask, 1, 8)


def test_mdgf_forward_and_ste_gradient():
    model, mod = prepared({"method": "mdgf", "decay_coef": 0.5})
    set_training_step(model, 2)
    model.train()
    x = torch.randn(5, 64)
    W = mod.weight.detach().clone()
    keep = nm_keep(W.abs(), 1, 8)
    beta = math.exp(-0.5 * 2)
    out = mod(x)
    torch.testing.assert_close(out, x @ (W * (keep + (~keep) * beta)).T + mod.bias.detach())
    assert int(mod.sparse_step) == 3  # one optimizer step per training forward
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(mod.weight.grad, g.T @ x)  # straight-through: every weight


def test_mdgf_exact_gradient_is_scaled():
    model, mod = prepared({"method": "mdgf", "decay_coef": 0.5, "grad_mode": "exact"})
    model.train()
    x = torch.randn(5, 64)
    W = mod.weight.detach().clone()
    keep = nm_keep(W.abs(), 1, 8)
    out = mod(x)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(mod.weight.grad, (g.T @ x) * (keep + (~keep) * 1.0))


def test_srste_gradient_decays_pruned_weights():
    model, mod = prepared({"method": "srste"})
    model.train()
    x = torch.randn(5, 64)
    W = mod.weight.detach().clone()
    keep = nm_keep(W.abs(), 1, 8)
    out = mod(x)
    torch.testing.assert_close(out, x @ (W * keep).T + mod.bias.detach())
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(mod.weight.grad, g.T @ x + 2e-4 * (~keep) * W)


def test_eval_uses_the_hard_target_mask_and_masks_follow_weights():
    model, mod = prepared({"method": "mdgf", "decay_coef": 0.0})  # beta stays 1: dense forward
    model.eval()
    x = torch.randn(3, 64)
    W = mod.weight.detach().clone()
    torch.testing.assert_close(mod(x), x @ (W * nm_keep(W.abs(), 1, 8)).T + mod.bias.detach())
    with torch.no_grad():  # a training update that changes the ranking changes the mask
        mod.weight[:, 0::8] = 100.0
    mod(x)
    assert mod.weight_mask[:, 0::8].all()


def test_finalize_bakes_the_mask_in_and_saves_compactly():
    model, mod = prepared({"method": "sdgf", "total_steps": 10})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
    assert finalize_sparse_training(model) == 1
    assert mod.training_config is None and is_nm(mod.weight_mask, 1, 8)
    assert not (mod.weight[~mod.weight_mask] != 0).any()
    assert set(mod.state_dict()) == {"weight_values", "weight_indices", "bias"}


def test_training_config_round_trips_through_surgery_config():
    model, mod = prepared({"method": "mdgf", "decay": "linear", "decay_coef": 0.01})
    again = SparseLinear.from_surgery_config(mod.surgery_config())
    again.load_state_dict(mod.state_dict())
    assert again.training_config == mod.training_config
    assert torch.equal(again.weight, mod.weight)
