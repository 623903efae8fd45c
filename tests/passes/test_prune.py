"""Pruning: masks, spec golden checks, SparseGPT/DSnoT behaviour, params, passes on tiny models."""

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.data import Dataset
from surgery.passapi import NM, CallValue, PassError, Percent, RunContext, State
from surgery.passes.prune import SparseLinear, check_masks
from surgery.passes.prune.dsnot_core import dsnot
from surgery.passes.prune.masks import (is_nm, layer_keep, nm_keep, pruned_count, row_keep,
                                        split_counts)
from surgery.passes.prune.sparsegpt_core import sparsegpt
from surgery.passes.prune.wanda import wanda_scores
from surgery.progress import Progress
from surgery.registry import get_pass


def tiny_llama(tie=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def block_linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers")}


def dataset():
    g = torch.Generator().manual_seed(1)
    return Dataset("calib", torch.randint(0, 256, (8, 32), generator=g),
                   torch.randint(0, 256, (2, 32), generator=g))


def run(method, model, sparsity, **kw):
    P = get_pass("prune", method)
    p = P(P.Params(sparsity=sparsity, **kw))
    ctx = RunContext(model=model, models={}, data={"calib": dataset()}, progress=Progress())
    return p.run(ctx, block_linears(model)).report


def correlated_inputs(cols=64, tokens=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3 + 0.1  # unequal column norms
    return (torch.randn(tokens, cols, generator=g) @ mix) * scale + 0.5


# --- masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 8), (1, 8), (2, 16), (1, 2), (4, 4)])
def test_nm_keep_has_exactly_n_per_group(n, m):
    W = torch.randn(7, 4 * m)
    keep = nm_keep(W.abs(), n, m)
    assert is_nm(keep, n, m)
    g = (W.abs() * keep).reshape(7, 4, m)
    dropped = (W.abs() * ~keep).reshape(7, 4, m)
    assert (g.masked_fill(~keep.reshape(7, 4, m), float("inf")).amin(-1)
            >= dropped.amax(-1)).all()  # every kept |w| >= every dropped one in its group


def test_nm_keeps_n_slots_even_for_zero_weights():
    keep = nm_keep(torch.zeros(2, 8), 2, 4)
    assert is_nm(keep, 2, 4)
    assert keep[0].tolist() == [True, True, False, False] * 2  # ties: lower index kept


def test_unstructured_ratio_is_exact():
    W = torch.randn(10, 7)
    for frac in (0.5, 0.6, 0.3, 0.0, 0.99):
        assert int((~layer_keep(W.abs(), frac)).sum()) == pruned_count(frac, 70)
        assert int((~row_keep(W.abs(), frac)).sum()) == pruned_count(frac, 70)
    assert pruned_count(0.6, 70) == 42
    counts = split_counts(0.6, [7] * 10)
    assert sum(counts) == 42 and set(counts) <= {4, 5}  # rows within one weight of their share


def test_row_scope_compares_within_rows():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert row_keep(W, 0.5).tolist() == [[False, False, True, True]] * 2
    assert layer_keep(W, 0.5).tolist() == [[False] * 4, [True] * 4]


# --- spec golden checks (ops.md §10) ----------------------------------------------------------

def test_wanda_with_equal_input_norms_equals_magnitude():
    W = torch.randn(16, 64)
    scores = wanda_scores(W, torch.full((64,), 3.7))
    assert torch.equal(nm_keep(scores, 2, 4), nm_keep(W.abs(), 2, 4))
    assert torch.equal(row_keep(scores, 0.6), row_keep(W.abs(), 0.6))
    assert torch.equal(layer_keep(scores, 0.6), layer_keep(W.abs(), 0.6))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_sparsegpt_identity_hessian_equals_magnitude_nm(n, m):
    W = torch.randn(16, 256)
    Wn, keep = sparsegpt(W, torch.eye(256), n=n, m=m)
    assert torch.equal(keep, nm_keep(W.abs(), n, m))
    assert torch.equal(Wn, W * keep)  # no error propagation: kept weights bit-identical


def test_sparsegpt_identity_hessian_unstructured_is_magnitude_per_128_block():
    W = torch.randn(8, 300)  # blocks of 128, 128, 44
    Wn, keep = sparsegpt(W, torch.eye(300), fraction=0.5)
    expected = torch.cat([layer_keep(W[:, a:b].abs(), 0.5)
                          for a, b in ((0, 128), (128, 256), (256, 300))], dim=1)
    assert torch.equal(keep, expected)
    assert torch.equal(Wn, W * keep)
    assert int((~keep).sum()) == 1200


def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction():
    X = correlated_inputs(64)
    W = torch.randn(32, 64)
    H = 2 * X.T @ X / X.shape[0]
    ref = X @ W.T

    def err(Wp):
        return float(((X @ Wp.T - ref) ** 2).mean())

    for n, m in ((2, 4), (1, 4)):
        Ws, keep = sparsegpt(W, H, n=n, m=m)
        assert is_nm(keep, n, m) and not (Ws[~keep] != 0).any()
        wanda = W * nm_keep(wanda_scores(W, X.norm(dim=0)), n, m)
        mag = W * nm_keep(W.abs(), n, m)
        assert err(Ws) < err(wanda) < err(mag)


def test_sparsegpt_dead_inputs_are_pruned_first():
    X = correlated_inputs(16)
    X[:, 3] = 0
    W = torch.randn(4, 16)
    Ws, keep = sparsegpt(W, X.T @ X, n=2, m=4)
    assert not keep[:, 3].any() and (Ws[:, 3] == 0).all()


# --- DSnoT ------------------------------------------------------------------------------------

def _dsnot_case(seed=0, rows=32, cols=64):
    X = correlated_inputs(cols, seed=seed)
    torch.manual_seed(seed)
    W = torch.randn(rows, cols)
    norms = X.norm(dim=0)
    return X, W, wanda_scores(W, norms), X.mean(0), X.var(0, unbiased=False)


def test_dsnot_unstructured_keeps_row_counts_and_lowers_mean_error():
    X, W, scores, mean, var = _dsnot_case()
    keep0 = row_keep(scores, 0.6)
    keep = dsnot(W, keep0, scores, scores, mean, var, threshold=0.0)
    assert torch.equal(keep.sum(1), keep0.sum(1))
    assert not torch.equal(keep, keep0)

    def bias_err(k):  # |expected output error| per row, what DSnoT minimises
        return float(((W * ~k) @ mean).abs().mean())

    assert bias_err(keep) < 0.5 * bias_err(keep0)


def test_dsnot_nm_keeps_the_pattern():
    X, W, scores, mean, var = _dsnot_case(1)
    keep0 = nm_keep(scores, 2, 4)
    keep = dsnot(W, keep0, scores, scores, mean, var, n=2, m=4, threshold=0.0)
    assert is_nm(keep, 2, 4) and not torch.equal(keep, keep0)
    assert float(((W * ~keep) @ mean).abs().mean()) < float(((W * ~keep0) @ mean).abs().mean())


def test_dsnot_threshold_above_every_error_changes_nothing():
    X, W, scores, mean, var = _dsnot_case(2)
    keep0 = row_keep(scores, 0.5)
    assert torch.equal(dsnot(W, keep0, scores, scores, mean, var, threshold=1e9), keep0)


def test_dsnot_zero_variance_column_does_not_break():
    X, W, scores, mean, var = _dsnot_case(3)
    var[5] = 0
    keep = dsnot(W, row_keep(scores, 0.5), scores, scores, mean, var, threshold=0.0)
    assert int(keep.sum()) == W.numel() // 2


def _dsnot_oracle(W, keep, initial, wanda, mean, var, n=None, m=None, max_cycles=50,
                  threshold=0.1, gamma=1.0, same_sign=True):
    """ops.md §7.2 DSnoT written row by row with Python lists (the spec, not the vectorised code)."""
    dm = (W * mean.view(1, -1)).tolist()
    key = (W * mean.view(1, -1) / var.clamp_min(1e-12).view(1, -1) ** gamma).tolist()
    keep, init = keep.clone(), keep.clone()
    for i in range(W.shape[0]):
        pruned = [j for j in range(W.shape[1]) if not init[i, j]]
        kept = [j for j in range(W.shape[1]) if init[i, j]]
        e = sum(dm[i][j] for j in pruned)
        s0 = (e > 0) - (e < 0)
        grow_up = sorted(pruned, key=lambda j: -key[i][j])  # e > 0: largest first
        grow_down = sorted(pruned, key=lambda j: key[i][j])  # e <= 0: smallest first
        pool = (sorted([j for j in kept if dm[i][j] < 0], key=lambda j: wanda[i, j].item())
                + [j for j in kept if dm[i][j] == 0]
                + sorted([j for j in kept if dm[i][j] > 0], key=lambda j: -wanda[i, j].item()))
        hi = lo = pf = 0
        pb = len(pool) - 1
        for _ in range(max_cycles):
            if e > 0:
                if hi >= len(grow_up):
                    break
                g, hi = grow_up[hi], hi + 1
            else:
                if lo >= len(grow_down):
                    break
                g, lo = grow_down[lo], lo + 1
            if n is None:
                if pf > pb:
                    break
                if e >= 0:
                    p, pf = pool[pf], pf + 1
                else:
                    p, pb = pool[pb], pb - 1
            else:  # the still kept, initially kept weight of g's group with the least metric
                group = [j for j in range(g - g % m, g - g % m + m) if init[i, j] and keep[i, j]]
                if not group:
                    break
                p = min(group, key=lambda j: initial[i, j].item())
            if keep[i, g] or not keep[i, p]:
                continue  # not a valid swap: skipped
            after = e + dm[i][p] - dm[i][g]
            if abs(e) > threshold and (((after > 0) - (after < 0)) == s0 or not same_sign):
                keep[i, p], keep[i, g], e = False, True, after
            else:
                break  # the first rejection freezes the row
    return keep


@pytest.mark.parametrize("nm,threshold,seed,same_sign", [
    (None, 0.1, 0, True), (None, 2.0, 1, True), ((2, 4), 0.1, 2, True), ((1, 4), 0.5, 3, True),
    (None, 0.1, 4, False),  # the reference's unstructured default (--without_same_sign)
])
def test_dsnot_equals_the_row_by_row_spec(nm, threshold, seed, same_sign):
    X, W, scores, mean, var = _dsnot_case(seed, rows=24, cols=64)
    mean = mean * 8  # x̄ as Σ_tokens x / n_sequences: errors well above the threshold
    n, m = nm or (None, None)
    keep0 = nm_keep(scores, n, m) if nm else row_keep(scores, 0.6)
    got = dsnot(W, keep0, scores, scores, mean, var, n=n, m=m, threshold=threshold,
                same_sign=same_sign)
    want = _dsnot_oracle(W, keep0, scores, scores, mean, var, n=n, m=m, threshold=threshold,
                         same_sign=same_sign)
    assert not torch.equal(want, keep0)
    assert torch.equal(got, want)
    assert torch.equal(got.sum(1), keep0.sum(1))
    if same_sign:  # the sign of every row's expected error is kept
        e0, e1 = ((W * ~keep0) @ mean), ((W * ~got) @ mean)
        assert torch.equal(torch.sign(e0), torch.sign(e1))


def test_sparsegpt_pass_is_layer_sequential_like_the_reference():
    """The reference order (sparsegpt: llama_sequential): all 7 Linears of block l get their
    Hessians from one forward of block l with its original weights, whose inputs are the outputs
    of the already pruned blocks < l; then all 7 are pruned; then block l is re-run pruned."""
    from surgery.passes.calib import LinearStats

    model = tiny_llama()
    run("sparsegpt", model, Percent(value=50), data="calib")
    ref = tiny_llama()
    calib = dataset().calibration
    for layer in range(2):
        paths = [p for p in block_linears(ref) if p.startswith(f"model.layers.{layer}.")]
        assert len(paths) == 7
        stats = {p: LinearStats(ref.get_submodule(p).in_features) for p in paths}
        hooks = [ref.get_submodule(p).register_forward_hook(
            (lambda p: lambda mod, i, o: stats[p].add(i[0]))(p)) for p in paths]
        with torch.no_grad():
            ref(input_ids=calib, use_cache=False)  # blocks < layer already pruned
        for h in hooks:
            h.remove()
        for p in paths:
            lin = ref.get_submodule(p)
            Wn, _ = sparsegpt(lin.weight.detach(), stats[p].hessian(), fraction=0.5)
            with torch.no_grad():
                lin.weight.copy_(Wn)
    got, want = block_linears(model), block_linears(ref)
    for p in got:
        torch.testing.assert_close(got[p].weight, want[p].weight, rtol=1e-4, atol=1e-5)
        assert torch.equal(got[p].weight_mask, want[p].weight != 0), p


# --- parameters and bind-time checks ----------------------------------------------------------

@pytest.mark.parametrize("sparsity,message", [
    (NM(n=5, m=4), "N must be at most M"),
    (NM(n=0, m=4), "N must be at least 1"),
    (Percent(value=150), "sparsity must be in [0, 100)"),
    (Percent(value=-5), "sparsity must be in [0, 100)"),
])
def test_bad_sparsity_is_a_validation_error(sparsity, message):
    for method in ("magnitude", "wanda", "sparsegpt"):
        P = get_pass("prune", method)
        with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace(")", r"\)")):
            P.Params(sparsity=sparsity, data="calib")


def test_params_refine_and_training_values():
    P = get_pass("prune", "wanda")
    p = P.Params(sparsity=NM(n=2, m=4), data="c",
                 refine=CallValue(name="dsnot", kwargs={"max_cycle_time": 10}))
    assert p.refine.max_cycle_time == 10 and p.refine.skip_layer == "mlp"
    assert P.Params(sparsity=NM(n=2, m=4), data="c", refine="dsnot").refine.update_threshold == 0.1
    with pytest.raises(ValidationError, match="unknown refinement `obs`"):
        P.Params(sparsity=NM(n=2, m=4), data="c", refine=CallValue(name="obs"))
    with pytest.raises(ValidationError, match="max_cycle_time"):
        P.Params(sparsity=NM(n=2, m=4), data="c",
                 refine=CallValue(name="dsnot", kwargs={"max_cycle_time": 0}))
    with pytest.raises(ValidationError, match="extra"):
        P.Params(sparsity=NM(n=2, m=4), data="c",
                 refine=CallValue(name="dsnot", kwargs={"cycles": 3}))
    M = get_pass("prune", "magnitude")
    with pytest.raises(ValidationError, match="needs calibration data"):
        M.Params(sparsity=Percent(value=50), refine="dsnot")
    with pytest.raises(ValidationError, match="need an N:M target"):
        M.Params(sparsity=Percent(value=50), training=CallValue(name="mdgf"))
    with pytest.raises(ValidationError, match="power of two"):
        M.Params(sparsity=NM(n=3, m=8), training=CallValue(name="sdgf", kwargs={"total_steps": 9}))
    with pytest.raises(ValidationError, match="needs total_steps"):
        M.Params(sparsity=NM(n=1, m=8), training=CallValue(name="sdgf"))
    S = get_pass("prune", "sparsegpt")
    with pytest.raises(ValidationError, match="damp must be in"):
        S.Params(sparsity=NM(n=2, m=4), data="c", damp=0)


def test_check_module_reports_indivisible_in_features():
    P = get_pass("prune", "magnitude")
    p = P(P.Params(sparsity=NM(n=2, m=4)))
    with torch.device("meta"):
        assert p.check_module("x", nn.Linear(10, 8)) == "M=4 does not divide in_features 10"
        assert p.check_module("x", nn.Linear(12, 8)) is None
    q = P(P.Params(sparsity=NM(n=1, m=8), training=CallValue(
        name="sdgf", kwargs={"structure": "fine", "total_steps": 100})))
    with torch.device("meta"):  # SDGF-geometric starts at 8:64, so 64 must divide in_features
        assert q.check_module("x", nn.Linear(96, 8)) == "M=64 does not divide in_features 96"
    assert P(P.Params(sparsity=Percent(value=50))).check_module("x", nn.Linear(10, 8)) is None


def test_states():
    P = get_pass("prune", "wanda")
    assert P.produces == {State.MASKED}
    assert State.QUANTIZED not in P.accepts and "cannot keep a sparsity mask" in P.refusals[
        State.QUANTIZED]
    assert State.ADAPTED not in P.accepts and State.MASKED in P.accepts


# --- passes on a tiny LLaMA ---------------------------------------------------------------------

@pytest.mark.parametrize("method,kw", [("magnitude", {}), ("wanda", {"data": "calib"}),
                                       ("sparsegpt", {"data": "calib"}),
                                       ("wanda", {"data": "calib",
                                                  "refine": {"skip_layer": "none",
                                                             "update_threshold": 0.0}})])
def test_pass_nm_every_group_has_n_kept(method, kw):
    model = tiny_llama()
    report = run(method, model, NM(n=2, m=4), **kw)
    layers = block_linears(model)
    assert len(layers) == 14 and report.modules == 14
    for path, mod in layers.items():
        assert isinstance(mod, SparseLinear) and (mod.n, mod.m) == (2, 4)
        assert is_nm(mod.weight_mask, 2, 4), path
        assert (mod.weight.reshape(-1, 4) != 0).sum(-1).max() <= 2
    assert check_masks(model) == []
    assert report.metrics["sparsity"] == 0.5
    model(torch.randint(0, 256, (1, 8)))  # still runs


@pytest.mark.parametrize("method,kw", [("magnitude", {}), ("magnitude", {"scope": "row"}),
                                       ("wanda", {"data": "calib"}),
                                       ("sparsegpt", {"data": "calib"})])
def test_pass_unstructured_ratio_exact(method, kw):
    model = tiny_llama()
    run(method, model, Percent(value=60), **kw)
    for path, mod in block_linears(model).items():
        assert int((~mod.weight_mask).sum()) == pruned_count(0.6, mod.weight.numel()), path
        assert not (mod.weight[~mod.weight_mask] != 0).any()


def test_wanda_refine_dsnot_changes_masks_but_not_mlp_by_default():
    base = tiny_llama()
    run("wanda", base, Percent(value=60), data="calib")
    model = tiny_llama()
    report = run("wanda", model, Percent(value=60), data="calib",
                 refine={"update_threshold": 0.0})
    assert report.metrics["dsnot_swaps"] > 0
    b, r = block_linears(base), block_linears(model)
    assert torch.equal(r["model.layers.0.self_attn.q_proj"].weight_mask.sum(1),
                       b["model.layers.0.self_attn.q_proj"].weight_mask.sum(1))
    assert torch.equal(r["model.layers.0.mlp.up_proj"].weight_mask,
                       b["model.layers.0.mlp.up_proj"].weight_mask)  # skip_layer="mlp"
    assert any(not torch.equal(r[p].weight_mask, b[p].weight_mask) for p in r if "attn" in p)


def test_pruning_a_tied_weight_is_refused():
    model = tiny_llama(tie=True)
    P = get_pass("prune", "magnitude")
    ctx = RunContext(model=model, models={}, data={}, progress=Progress())
    with pytest.raises(PassError, match="tied to model.embed_tokens"):
        P(P.Params(sparsity=NM(n=2, m=4))).run(ctx, {"lm_head": model.lm_head})


def test_reprune_a_pruned_module_to_higher_sparsity():
    model = tiny_llama()
    run("magnitude", model, Percent(value=50))
    run("magnitude", model, NM(n=1, m=4))
    for mod in block_linears(model).values():
        assert is_nm(mod.weight_mask, 1, 4) and not (mod.weight[~mod.weight_mask] != 0).any()


def test_deterministic():
    a, b = tiny_llama(), tiny_llama()
    run("sparsegpt", a, NM(n=2, m=4), data="calib")
    run("sparsegpt", b, NM(n=2, m=4), data="calib")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
