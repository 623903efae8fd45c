"""`compensate ... using eora|svd`: the projection's identities, the layer, the verb's checks,
save/load and the PEFT export (fast, tiny shapes)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import load_model
from surgery.passapi import State, carried_states
from surgery.passes.compensate.layer import CompensatedLinear
from surgery.passes.compensate.lowrank import (eigen_scaling, eora_accumulated_factors,
                                               eora_factors, output_error, svd_factors)
from surgery.passes.compensate.passes import CompensateParams
from surgery.passes.prune.sparse_linear import SparseLinear
from surgery.passes.quantize.qlinear import QuantLinear

F64 = torch.float64


def problem(out=24, inp=40, n=64, seed=0):
    """A weight error and correlated, anisotropic calibration inputs X (in, n)."""
    g = torch.Generator().manual_seed(seed)
    dW = torch.randn(out, inp, generator=g, dtype=F64) * 0.1
    mix = torch.randn(inp, inp, generator=g, dtype=F64)
    X = mix @ torch.randn(inp, n, generator=g, dtype=F64) * torch.linspace(
        0.05, 3, inp, dtype=F64)[:, None]
    return dW, X


# -- the identities ------------------------------------------------------------------------------

@pytest.mark.parametrize("factors", ["eora", "svd"])
def test_zero_error_gives_an_exactly_zero_path(factors):
    _, X = problem()
    dW = torch.zeros(24, 40, dtype=F64)
    B, A = eora_factors(dW, X @ X.T, 8) if factors == "eora" else svd_factors(dW, 8)
    assert B.shape == (24, 8) and A.shape == (8, 40)
    assert not B.any() and not A.any()


@pytest.mark.parametrize("n", [64, 16])  # full-rank inputs, and fewer tokens than in_features
def test_full_rank_reproduces_the_original_output_on_the_calibration_inputs(n):
    dW, X = problem(n=n)
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(1), dtype=F64)
    Wc = W - dW
    B, A = eora_factors(dW, X @ X.T, min(dW.shape))
    ref = W @ X
    assert float(((Wc + B @ A) @ X - ref).abs().max() / ref.abs().max()) < 1e-12
    if n >= 40:  # X spans every input direction: the path is the whole error
        assert float((B @ A - dW).abs().max() / dW.abs().max()) < 1e-9


def test_identity_covariance_makes_eora_plain_svd():
    dW, _ = problem()
    for scale in (1.0, 7.5):  # any multiple of I: the eigenspace is every orthonormal basis
        B, A = eora_factors(dW, scale * torch.eye(40, dtype=F64), 8)
        Bs, As = svd_factors(dW, 8)
        assert float((B @ A - Bs @ As).abs().max()) < 1e-12


def test_eora_attains_the_eckart_young_optimum_of_the_scaled_error():
    """||(dW - BA) X||² = Σ_{i>r} σ_i(dW Q')² and no rank-r path does better (SVD included)."""
    dW, X = problem()
    G = X @ X.T
    scale, inv = eigen_scaling(G)
    torch.testing.assert_close(scale @ inv, torch.eye(40, dtype=F64), rtol=0, atol=1e-10)
    sigma = torch.linalg.svdvals(dW @ scale)
    for r in (1, 4, 12):
        B, A = eora_factors(dW, G, r)
        got = output_error(dW - B @ A, G)
        assert got == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-9)
        Bs, As = svd_factors(dW, r)
        assert got < output_error(dW - Bs @ As, G)


def test_factors_share_the_singular_values_evenly():
    """B = U_r Σ_r^{1/2}: B's column norms squared are the kept singular values (of dW Q' for
    eora, of dW for svd), and A carries the other half."""
    dW, X = problem()
    G = X @ X.T
    scale, _ = eigen_scaling(G)
    B, A = eora_factors(dW, G, 6)
    torch.testing.assert_close(B.norm(dim=0) ** 2, torch.linalg.svdvals(dW @ scale)[:6],
                               rtol=1e-9, atol=0)
    torch.testing.assert_close((A @ scale).norm(dim=1) ** 2, B.norm(dim=0) ** 2, rtol=1e-9,
                               atol=0)
    Bs, As = svd_factors(dW, 6)
    torch.testing.assert_close(Bs.norm(dim=0) ** 2, torch.linalg.svdvals(dW)[:6], rtol=1e-9,
                               atol=0)
    torch.testing.assert_close(As.norm(dim=1), Bs.norm(dim=0), rtol=1e-9, atol=0)


def accumulated_problem(seed=0):
    """W, W_c and the compressed model's inputs X_c next to the original's X_o = X_c + drift."""
    dW, Xc = problem(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    W = torch.randn(24, 40, generator=g, dtype=F64)
    Xo = Xc + 0.3 * torch.randn(40, 64, generator=g, dtype=F64)
    return W, W - dW, Xo, Xc


def test_accumulated_target_with_unchanged_inputs_and_no_ridge_is_plain_eora():
    W, Wc, _, X = accumulated_problem()
    G = X @ X.T
    (B, A), share = eora_accumulated_factors(W, Wc, G, G, 6, 1.0, damping=0.0)
    B0, A0 = eora_factors(W - Wc, G, 6)
    torch.testing.assert_close(B @ A, B0 @ A0, rtol=0, atol=1e-9 * float((B0 @ A0).abs().max()))
    assert share == pytest.approx(1 - output_error(W - Wc - B0 @ A0, G) / output_error(W - Wc, G),
                                  rel=1e-9)


def test_accumulated_target_at_full_rank_is_the_least_squares_fit_of_the_original_output():
    """No ridge, full rank: the residual W X_o - (W_c + BA) X_c is orthogonal to the inputs X_c
    (the normal equations), and no other path leaves a smaller one."""
    W, Wc, Xo, Xc = accumulated_problem()
    G, C = Xc @ Xc.T, Xo @ Xc.T
    (B, A), share = eora_accumulated_factors(W, Wc, G, C, 24, 1.0, damping=0.0)
    residual = W @ Xo - (Wc + B @ A) @ Xc
    assert float((residual @ Xc.T).abs().max()) < 1e-9 * float((W @ Xo).abs().max()) * 64
    assert share == pytest.approx(1.0, abs=1e-12)
    local_B, local_A = eora_factors(W - Wc, G, 24)  # the layer's own error only
    assert residual.norm() < (W @ Xo - (Wc + local_B @ local_A) @ Xc).norm()


def test_a_share_of_the_upstream_error_targets_the_blended_inputs():
    """upstream = a fits W X_a with X_a = a X_o + (1 - a) X_c: the same path as upstream = 1 on
    inputs whose original-model side is X_a."""
    W, Wc, Xo, Xc = accumulated_problem(seed=5)
    G = Xc @ Xc.T
    for a in (0.25, 0.5):
        Xa = a * Xo + (1 - a) * Xc
        (B, A), _ = eora_accumulated_factors(W, Wc, G, Xo @ Xc.T, 6, a, damping=0.02)
        (B1, A1), _ = eora_accumulated_factors(W, Wc, G, Xa @ Xc.T, 6, 1.0, damping=0.02)
        torch.testing.assert_close(B @ A, B1 @ A1, rtol=0,
                                   atol=1e-9 * float((B1 @ A1).abs().max()))


def test_accumulated_target_attains_the_rank_r_optimum_with_a_ridge():
    """With ridge μ, the objective ||W X_o - (W_c + L) X_c||² + μ||L||² at the rank-r path is
    below that of random rank-r perturbations of it (a local optimality check) and of the
    local-error EoRA path."""
    W, Wc, Xo, Xc = accumulated_problem(seed=3)
    G, C = Xc @ Xc.T, Xo @ Xc.T
    mu = 0.05 * float(G.diagonal().mean())

    def objective(L):
        return float((W @ Xo - (Wc + L) @ Xc).norm() ** 2 + mu * L.norm() ** 2)

    (B, A), _ = eora_accumulated_factors(W, Wc, G, C, 5, 1.0, damping=0.05)
    best = objective(B @ A)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dB = 1e-3 * torch.randn(B.shape, generator=g, dtype=F64)
        dA = 1e-3 * torch.randn(A.shape, generator=g, dtype=F64)
        assert best <= objective((B + dB) @ (A + dA))
    B0, A0 = eora_factors(W - Wc, G, 5)
    assert best < objective(B0 @ A0)


# -- rank patterns --------------------------------------------------------------------------------

def test_rank_pattern_first_match_wins():
    p = CompensateParams(rank=[["**.mlp.*", 64], ["**", 16]])
    assert p.rank_for("model.layers.3.mlp.up_proj") == 64
    assert p.rank_for("model.layers.3.self_attn.q_proj") == 16
    assert CompensateParams(rank=[["**.mlp.*", 4]]).rank_for("model.layers.0.self_attn.q_proj") \
        is None
    assert CompensateParams(rank=8).rank_for("anything") == 8


@pytest.mark.parametrize("rank,msg", [(0, "positive integer"), (2.5, "positive integer"),
                                      ([["**", 0]], "positive integer"), ([], "at least one"),
                                      ([["**"]], "pair"), (True, "positive integer")])
def test_bad_ranks_are_parameter_errors(rank, msg):
    with pytest.raises(ValueError, match=msg):
        CompensateParams(rank=rank)


# -- through the compiler ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved as an `hf:` source (compensate reloads its float weights)."""
    tok = load_model("zoo:smollm2-135m").tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      architectures=["LlamaForCausalLM"])
    d = tmp_path_factory.mktemp("tiny") / "base"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


HEAD = 'model base = "hf:{d}"\ndata calib = corpus("pydoc", samples=8, seqlen=64)\n'
MLP = 'modules("model.layers.*.mlp.*_proj")'


def run(base_dir, body):
    return surgery.apply(None, HEAD.format(d=base_dir) + body)


def test_eora_after_gptq_int3_saves_loads_and_exports_peft(base_dir, tmp_path):
    res = run(base_dir, f"quantize {MLP} to int3 using gptq(data=calib, group=32)\n"
                        f"compensate {MLP} using eora(rank=8, data=calib)\n"
                        f'save "{tmp_path}/out"\nexport peft "{tmp_path}/peft"\n')
    model = res.model
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, CompensatedLinear) and isinstance(layer.base_layer, QuantLinear)
    assert carried_states(layer) >= {State.COMPENSATED, State.ADAPTED}
    assert layer.r == 8 and layer.scaling == 1.0 and layer.method == "eora"
    step = next(s for s in res.report.steps if s.verb == "compensate")
    rec = [r["output_error_recovered"] for r in step.report.per_module.values()]
    assert len(rec) == 6 and all(0.0 < r < 1.0 for r in rec)
    assert step.report.metrics["added_parameters"] == 8 * (64 + 128) * 6
    back = surgery.load(tmp_path / "out")
    assert isinstance(back.get_submodule("model.layers.0.mlp.up_proj"), CompensatedLinear)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert len(cfg["target_modules"]) == 6


def test_eora_beats_svd_on_the_layer_output_error(base_dir):
    rows = {}
    for method in ("eora(rank=4, data=calib)", "svd(rank=4)"):
        res = run(base_dir, f"quantize {MLP} to int2 using rtn(group=32)\n"
                            f"compensate {MLP} using {method}\n")
        rows[method[:4]] = res.model
    # EoRA is the optimum on its calibration inputs: the first layer's gate_proj sees the same
    # inputs in both models (nothing before it is compensated), so on `calib` it must win
    from surgery.data import corpus

    lm = load_model(f"hf:{base_dir}")
    ids = corpus(lm.tokenizer, "pydoc", samples=8, seqlen=64).calibration
    ref = lm.model.get_submodule("model.layers.0.mlp.gate_proj")
    errs = {}
    for name, model in rows.items():
        layer = model.get_submodule("model.layers.0.mlp.gate_proj")
        seen = {}
        h = layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        x = seen["x"].reshape(-1, 64)
        with torch.no_grad():
            errs[name] = float((layer(x) - ref(x)).norm())
    assert errs["eora"] < errs["svd("]


@pytest.mark.parametrize("within", ["original", "compressed"])
def test_eigenspace_inputs_inside_a_block(base_dir, monkeypatch, within):
    # Block 0's down_proj follows gate/up in the same block. "original" (the default, the public
    # EoRA code's calibration) takes its eigenspace from the inputs the uncompressed gate/up
    # give; "compressed" from the int2 ones.
    from surgery.data import corpus
    from surgery.passes.compensate import passes as comp

    grams = {}
    real = comp.eora_factors
    monkeypatch.setattr(comp, "eora_factors", lambda dW, G, r: (
        grams.setdefault(len(grams), G.clone()), real(dW, G, r))[1])
    run(base_dir, f"quantize {MLP} to int2 using rtn(group=32)\n"
                  f"compensate {MLP} using eora(rank=4, data=calib, within_block={within!r})\n"
                  .replace("'", '"'))
    down = grams[2]  # gate, up, down of block 0, in call order
    lm = load_model(f"hf:{base_dir}")
    ids = corpus(lm.tokenizer, "pydoc", samples=8, seqlen=64).calibration
    seen = []
    layer = lm.model.get_submodule("model.layers.0.mlp.down_proj")
    h = layer.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        lm.model(input_ids=ids)
    h.remove()
    x = torch.cat(seen).double()
    original = x.T @ x
    close = torch.allclose(down, original, rtol=1e-4, atol=1e-3 * float(original.abs().max()))
    assert close == (within == "original")


def test_accumulated_error_pairs_the_original_models_inputs(base_dir):
    """upstream=1: block 0's gate/up see the same inputs in both models (nothing before
    them is compressed), so without a ridge their paths are plain EoRA's; block 1's layers sit
    behind compressed ones and get a different path."""
    paths = {}
    for error, upstream in (("layer", 0), ("accumulated", 1)):
        res = run(base_dir, f"quantize {MLP} to int2 using rtn(group=32)\n"
                            f"compensate {MLP} using eora(rank=4, data=calib, "
                            f"upstream={upstream}, damping=0)\n")
        paths[error] = {p: (m.lora_B.weight @ m.lora_A.weight).detach()
                        for p, m in res.model.named_modules()
                        if isinstance(m, CompensatedLinear)}
        step = next(s for s in res.report.steps if s.verb == "compensate")
        assert all(0.0 < r["output_error_recovered"] <= 1.0
                   for r in step.report.per_module.values())
    for p, layer in paths["layer"].items():
        same = torch.allclose(paths["accumulated"][p], layer, rtol=1e-4,
                              atol=1e-5 * float(layer.abs().max()))
        assert same == (p.startswith("model.layers.0.") and "down" not in p), p


@pytest.mark.parametrize("bad, msg", [("damping=-1", "damping must be >= 0"),
                                      ("upstream=1.5", "upstream must be between 0 and 1")])
def test_bad_accumulated_parameters_are_parameter_errors(base_dir, bad, msg):
    with pytest.raises(SurgeryError) as e:
        run(base_dir, f"quantize {MLP} to int2 using rtn(group=32)\n"
                      f"compensate {MLP} using eora(rank=4, data=calib, {bad})\n")
    assert msg in str(e.value)


@pytest.mark.parametrize("method", ["svd(rank=6)", "eora(rank=6, data=calib, upstream=0.25)"])
def test_a_pruned_layers_path_is_a_lora_adapter_peft_reproduces(base_dir, tmp_path, method):
    from peft import PeftModel

    res = run(base_dir, f"prune {MLP} to 2:4 using magnitude()\n"
                        f"compensate {MLP} using {method}\n"
                        f'export peft "{tmp_path}/peft"\n')
    model = res.model
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer.base_layer, SparseLinear) and layer.method == method.split("(")[0]
    # PEFT's LoRA on a plain model holding the pruned weights = our compensated model
    plain = LlamaForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, CompensatedLinear):
                plain.get_submodule(name).weight.copy_(m.base_layer.weight)
    peft = PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_pruned_then_quantized_layer_is_compensated_against_the_float_weight(base_dir):
    res = run(base_dir, f"prune {MLP} to 2:4 using magnitude()\n"
                        f"quantize {MLP} to int4 using rtn(group=32)\n"
                        f"compensate {MLP} using svd(rank=64)\n")
    layer = res.model.get_submodule("model.layers.0.mlp.down_proj")  # 64 x 128: rank 64 = full
    W = load_model(f"hf:{base_dir}").model.get_submodule("model.layers.0.mlp.down_proj").weight
    total = layer.base_layer.dequantized_weight() + layer.delta_weight()
    torch.testing.assert_close(total, W.detach(), rtol=0, atol=1e-5)


# -- located errors -------------------------------------------------------------------------------

def plan_error(base_dir, body) -> SurgeryError:
    with pytest.raises(SurgeryError) as e:
        surgery.compile(HEAD.format(d=base_dir) + body).plan()
    return e.value


def test_uncompressed_layer_is_refused_at_plan_time(base_dir):
    err = plan_error(base_dir, f"quantize {MLP} to int4\n"
                               'compensate modules("model.layers.0.self_attn.q_proj") '
                               "using svd(rank=4)\n")
    d = err.diagnostics[0]
    assert d.code == "E0401" and d.span.line == 4
    assert "not compressed" in d.message and "model.layers.0.self_attn.q_proj" in d.message


def test_rank_above_min_in_out_is_a_shape_error(base_dir):
    err = plan_error(base_dir, f"quantize {MLP} to int4\n"
                               f"compensate {MLP} using eora(rank=65, data=calib)\n")
    d = err.diagnostics[0]
    assert d.code == "E0402" and d.span.line == 4
    assert "rank 65 exceeds min(in_features, out_features) = 64" in d.message


def test_rank_pattern_missing_a_layer_is_a_shape_error(base_dir):
    err = plan_error(base_dir, f"quantize {MLP} to int4\n"
                               f'compensate {MLP} using svd(rank=[["**.up_proj", 4]])\n')
    assert err.diagnostics[0].code == "E0402" and "no rank pattern matches" in str(err)


def test_compensating_twice_and_compressing_after_are_order_errors(base_dir):
    err = plan_error(base_dir, f"quantize {MLP} to int4\ncompensate {MLP} using svd(rank=4)\n"
                               f"compensate {MLP} using svd(rank=4)\n")
    assert err.diagnostics[0].code == "E0500" and "compensated at line 4" in str(err)
    err = plan_error(base_dir, f"prune {MLP} to 50%\ncompensate {MLP} using svd(rank=4)\n"
                               f"quantize {MLP} to int4\n")
    assert err.diagnostics[0].code == "E0500" and "compensated at line 4" in str(err)


def test_eora_without_data_is_a_check_error(base_dir):
    with pytest.raises(SurgeryError, match="data"):
        surgery.compile(HEAD.format(d=base_dir) + f"quantize {MLP} to int4\n"
                        f"compensate {MLP} using eora(rank=4)\n").check()


def test_a_model_that_cannot_be_reloaded_is_a_run_time_error(base_dir):
    from surgery.models import LoadedModel

    lm = load_model(f"hf:{base_dir}")
    lm = LoadedModel(model=lm.model, source="python:LlamaForCausalLM", tokenizer=lm.tokenizer,
                     config=lm.config)
    with pytest.raises(SurgeryError) as e:
        surgery.apply(lm, HEAD.format(d=base_dir) + f"quantize {MLP} to int4\n"
                      f"compensate {MLP} using svd(rank=4)\n")
    assert e.value.diagnostics[0].code == "E0801" and "cannot be reloaded" in str(e.value)
