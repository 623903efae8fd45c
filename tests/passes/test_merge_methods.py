"""Parameter-space merges: the spec's worked values, identities, pass API, bad input."""

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.passapi import RunContext
from surgery.progress import Progress
from surgery.registry import get_pass
from surgery.passes.merge.dare import dare_drop
from surgery.passes.merge.pcb import clamp_rows, pcb_combine
from surgery.passes.merge.taskvec import merge_global
from surgery.passes.merge.ties import ties_combine, trim_topk
from surgery.passes.merge.widen import widen_merge

D = torch.float64
T = torch.tensor([[0.5, -0.1, 0.3, 0, -0.7, 0.2], [-0.4, 0.2, 0.1, 0.6, -0.1, -0.3],
                  [0.1, 0.3, -0.2, -0.5, -0.6, 0.05]], dtype=D)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D),
                               atol=atol, rtol=0)


# --- spec worked values --------------------------------------------------------------------

def test_ties_golden_mergelm_semantics():
    trimmed = trim_topk(T, 0.5, "ties_ref")
    close(trimmed, [[0.5, 0, 0.3, 0, -0.7, 0.2], [-0.4, 0.2, 0, 0.6, 0, -0.3],
                    [0, 0.3, -0.2, -0.5, -0.6, 0]])
    close(ties_combine(T, 0.5, "ties_ref"), [0.5, 0.25, 0.3, 0.6, -0.65, -0.3])


def test_ties_exact_topk_keeps_exactly_k():
    X = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    for density in (0.1, 0.5, 0.2):
        assert ((trim_topk(X, density) != 0).sum(1) == int(1000 * density)).all()
    assert torch.equal(trim_topk(X, 1.0), X)


def test_lean_ties_equals_reference_formulation(monkeypatch):
    import surgery.passes.merge.ties as ties_mod
    from surgery.passes.merge.ties import ties_lean
    monkeypatch.setattr(ties_mod, "CHUNK", 1000)  # small chunks: several boundaries, fast
    g = torch.Generator().manual_seed(0)
    d = 3500  # crosses chunk boundaries, with many tied magnitudes (rounded deltas)
    base = torch.randn(d, generator=g)
    ts = [base + torch.randn(d, generator=g).round(decimals=1) for _ in range(3)]
    T = torch.stack([t - base for t in ts])
    for density in (0.2, 0.5, 1.0):
        for compat in ("exact", "ties_ref"):
            for how in ("mean", "sum", "max"):
                assert torch.equal(ties_lean(base, ts, density, compat, how),
                                   ties_combine(T, density, compat, how))


def test_pcb_golden():
    A = clamp_rows(T.abs(), 1e-4, 1e-4)
    close(A, [[0.5, 0.1, 0.3, 0, 0.5, 0.2], [0.4, 0.2, 0.1, 0.4, 0.1, 0.3],
              [0.1, 0.3, 0.2, 0.5, 0.5, 0.05]])
    close(pcb_combine(T, 0.5, 1e-4), [0.5, 0.3, 0, 0.4, -0.494995, 0])


W0 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]], dtype=D)
W1 = torch.tensor([[1.1, 0.0, 2.0], [0.0, 1.0, 2.5]], dtype=D)
W2 = torch.tensor([[1.0, 0.5, 2.0], [0.2, 1.0, 2.0]], dtype=D)


def test_widen_golden_matrix():
    close(widen_merge(W0, [W1, W2], 1.0, 1.0, "matrix"), [[1.045871, 0.5, 2.0], [0.108257, 1.0, 2.5]])


def test_widen_golden_vector():
    b0 = torch.tensor([0, 1, 0.5, -0.5], dtype=D)
    b1 = torch.tensor([0.1, 1, 0.5, -0.5], dtype=D)
    b2 = torch.tensor([0, 1.3, 0.4, -0.5], dtype=D)
    close(widen_merge(b0, [b1, b2], 1.0, 1.0, "other"), [0.1, 1.3, 0.447502, -0.5])


def test_widen_embedding_is_transposed():
    # Rows of an embedding are tokens: WIDEN on E equals WIDEN on the matrix E^T, transposed.
    out = widen_merge(W0.T, [W1.T, W2.T], 1.0, 1.0, "embedding")
    close(out, torch.tensor([[1.045871, 0.5, 2.0], [0.108257, 1.0, 2.5]], dtype=D).T)


def test_dare_drop_and_rescale():
    tau = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    out = dare_drop(tau, 0.3, "inverse_keep_prob", torch.Generator().manual_seed(2))
    kept = out != 0
    assert 0.65 < kept.float().mean() < 0.75
    assert torch.equal(out[kept], tau[kept] / 0.7)
    assert torch.equal(dare_drop(tau, 0.0, "inverse_keep_prob", torch.Generator()), tau)
    assert (dare_drop(tau, 1.0, "inverse_keep_prob", torch.Generator()) == 0).all()
    l1 = dare_drop(tau, 0.5, "l1_match", torch.Generator().manual_seed(3)).abs().sum()
    torch.testing.assert_close(l1, tau.abs().sum())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, generator=torch.Generator().manual_seed(5))
    mean_l1 = torch.stack([dare_drop(x, 0.5, "inverse_keep_prob", g).abs().sum()
                           for _ in range(1000)]).mean()
    assert abs(mean_l1 / x.abs().sum() - 1) < 0.01


def test_global_scope_flattens_all_tensors():
    base = {"a": torch.zeros(2, 2, dtype=D), "b": torch.zeros(3, dtype=D)}
    ms = [{"a": torch.tensor([[1., -2], [3, 0]], dtype=D), "b": torch.tensor([0.5, 4, -1], dtype=D)},
          {"a": torch.tensor([[-1., 2], [1, 1]], dtype=D), "b": torch.tensor([1, -3, 2], dtype=D)}]
    out = merge_global(["a", "b"], base, ms, lambda T: ties_combine(T, 0.5))
    T2 = torch.stack([torch.cat([m["a"].reshape(-1), m["b"]]) for m in ms])
    want = ties_combine(T2, 0.5)
    close(torch.cat([out["a"].reshape(-1), out["b"]]), want)


# --- through the pass API -----------------------------------------------------------------

def tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def run(method, models, names, base=None, **kw):
    P = get_pass("merge", method)
    p = P(P.Params(models=names, base=base, **kw))
    ctx = RunContext(model=models[names[0]], models=models, data={}, progress=Progress(), seed=0)
    result = p.run(ctx, {})
    return result.model, result.report


@pytest.mark.parametrize("method,kw", [("linear", {}), ("task_arithmetic", {}), ("ties", {}),
                                       ("ties", {"scope": "global"}), ("dare", {}),
                                       ("dare", {"combine": "ties"}), ("dare", {"combine": "widen"}),
                                       ("pcb", {}), ("pcb", {"scope": "global"}), ("widen", {}),
                                       ("weight_matching", {})])
def test_merging_a_model_with_itself_returns_it(method, kw):
    a = tiny(0)
    base = None if method in ("linear", "weight_matching") else "a"
    out, _ = run(method, {"a": a, "a2": copy.deepcopy(a)}, ["a", "a2"], base=base, **kw)
    for k, v in a.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), (method, k)


def test_task_arithmetic_and_linear_values():
    b, x, y = tiny(0), tiny(1), tiny(2)
    models = {"b": b, "x": x, "y": y}
    ta, _ = run("task_arithmetic", models, ["x", "y"], base="b", scale=0.5)
    lin, _ = run("linear", models, ["x", "y"], weights=[3.0, 1.0])
    k = "model.layers.0.mlp.up_proj.weight"
    sb, sx, sy = b.state_dict()[k], x.state_dict()[k], y.state_dict()[k]
    torch.testing.assert_close(ta.state_dict()[k], sb + 0.5 * ((sx - sb) + (sy - sb)))
    torch.testing.assert_close(lin.state_dict()[k], (3 * sx + sy) / 4)
    zero, _ = run("task_arithmetic", models, ["x", "y"], base="b", **{"lambda": 0.0})
    assert torch.equal(zero.state_dict()[k], sb)


def test_ties_one_model_full_density_is_task_arithmetic():
    b, x = tiny(0), tiny(1)
    t, _ = run("ties", {"b": b, "x": x}, ["x"], base="b", density=1.0)
    for k, v in x.state_dict().items():
        torch.testing.assert_close(t.state_dict()[k], v)


def test_dare_p0_is_task_arithmetic_and_p1_is_base():
    b, x, y = tiny(0), tiny(1), tiny(2)
    models = {"b": b, "x": x, "y": y}
    d0, _ = run("dare", models, ["x", "y"], base="b", p=0.0)
    ta, _ = run("task_arithmetic", models, ["x", "y"], base="b")
    d1, _ = run("dare", models, ["x", "y"], base="b", p=1.0)
    for k in b.state_dict():
        torch.testing.assert_close(d0.state_dict()[k], ta.state_dict()[k])
        assert torch.equal(d1.state_dict()[k], b.state_dict()[k])


def test_dare_is_deterministic_per_seed():
    b, x, y = tiny(0), tiny(1), tiny(2)
    models = {"b": b, "x": x, "y": y}
    r1, _ = run("dare", models, ["x", "y"], base="b")
    r2, _ = run("dare", models, ["x", "y"], base="b")
    for k in b.state_dict():
        assert torch.equal(r1.state_dict()[k], r2.state_dict()[k])


def test_exclusion_patterns_copy_from_base_and_inputs_untouched():
    b, x, y = tiny(0), tiny(1), tiny(2)
    before = {k: v.clone() for k, v in x.state_dict().items()}
    out, rep = run("ties", {"b": b, "x": x, "y": y}, ["x", "y"], base="b",
                   exclude=[r"model\.layers\.1\.", "lm_head"])
    for k, v in out.state_dict().items():
        if k.startswith("model.layers.1."):
            assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in out.state_dict().items()
               if k.startswith("model.layers.0."))
    for k, v in x.state_dict().items():
        assert torch.equal(v, before[k])  # inputs are never modified
    assert rep.parameters > 0


def test_dtype_and_shapes_preserved():
    b, x = tiny(0).to(torch.bfloat16), tiny(1).to(torch.bfloat16)
    for m in ("task_arithmetic", "ties", "widen", "pcb", "dare"):
        out, _ = run(m, {"b": b, "x": x}, ["x"], base="b")
        for k, v in out.state_dict().items():
            assert v.dtype == torch.bfloat16 and v.shape == b.state_dict()[k].shape
            assert torch.isfinite(v.float()).all()


# --- bad input ------------------------------------------------------------------------------

def test_missing_base_is_a_check_time_error():
    for m in ("task_arithmetic", "ties", "dare", "pcb", "widen"):
        P = get_pass("merge", m)
        with pytest.raises(ValidationError, match="needs a base model"):
            P.Params(models=["x", "y"])


def test_different_architectures_fail_naming_tensors():
    a = tiny(0)
    torch.manual_seed(1)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=64))
    deeper = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=64))
    P = get_pass("merge", "ties")
    p = P(P.Params(models=["a", "b"], base="a"))
    probs = p.check_models({"a": a, "b": other})
    assert probs and "mlp.gate_proj.weight (64, 32) vs (48, 32)" in probs[0]
    probs = p.check_models({"a": a, "b": deeper})
    assert probs and "different architecture" in probs[0] and "model.layers.2." in probs[0]
    from surgery.passapi import PassError
    with pytest.raises(PassError, match="differ in"):
        run("linear", {"a": a, "b": other}, ["a", "b"])


def test_bad_params_are_validation_errors():
    with pytest.raises(ValidationError):
        get_pass("merge", "ties").Params(density=0.0)
    with pytest.raises(ValidationError):
        get_pass("merge", "dare").Params(p=1.5)
    with pytest.raises(ValidationError, match="weights has 3 entries"):
        get_pass("merge", "linear").Params(models=["a", "b"], weights=[1, 2, 3])
    with pytest.raises(ValidationError):
        get_pass("merge", "widen").Params(bogus=1)
