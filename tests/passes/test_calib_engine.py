"""The layer-sequential calibration engine and the Hessian helpers."""

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from surgery.passes.calib import (LinearStats, add_damping, calibrate_sequential, dead_columns,
                                  find_blocks, inverse_cholesky_upper, prepare_hessian)
from surgery.progress import Progress


def tiny_llama(layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


def linears(model, exclude=("lm_head",)):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(e in n for e in exclude)}


def reference_stats(model, paths, calib, call):
    """Stats of every target from plain forwards of ``model`` as it is now."""
    stats = {p: LinearStats(model.get_submodule(p).in_features) for p in paths}
    hs = [model.get_submodule(p).register_forward_hook(
        (lambda p: lambda m, i, o: stats[p].add(i[0]))(p)) for p in paths]
    with torch.no_grad():
        for i in range(0, calib.shape[0], 4):
            call(calib[i:i + 4])
    for h in hs:
        h.remove()
    return stats


def halve(seen):
    def transform(mods, stats):
        for p, m in mods.items():
            seen[p] = stats[p]
            m.weight.mul_(0.5)
    return transform


@pytest.mark.parametrize("kind", ["llama", "bert", "sequential", "flat"])
def test_true_sequential_stats_equal_final_model_inputs(kind):
    """Every group is calibrated on the outputs of all earlier transformed groups, so its stats
    equal those a forward of the final model sees."""
    g = torch.Generator().manual_seed(0)
    if kind == "llama":
        model = tiny_llama()
        calib = torch.randint(0, 256, (8, 16), generator=g)
        call = lambda x: model(input_ids=x, use_cache=False)  # noqa: E731
    elif kind == "bert":
        model = tiny_bert()
        calib = torch.randint(0, 128, (8, 16), generator=g)
        call = lambda x: model(input_ids=x)  # noqa: E731
    else:
        torch.manual_seed(0)
        if kind == "sequential":
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                                  nn.Linear(16, 4))
        else:
            class Flat(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

                def forward(self, x):
                    return self.b(torch.relu(self.a(x)))
            model = Flat()
        calib = torch.randn(8, 8, generator=g)
        call = model
    targets = linears(model)
    seen = {}
    calibrate_sequential(model, calib, targets, halve(seen), progress=Progress(), batch_size=4,
                         true_sequential=True)
    assert set(seen) == set(targets)
    ref = reference_stats(model, list(targets), calib, call)
    for p in targets:
        assert seen[p].tokens == ref[p].tokens and seen[p].samples == ref[p].samples
        torch.testing.assert_close(seen[p].gram, ref[p].gram, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[p].sum, ref[p].sum, rtol=1e-5, atol=1e-5)


def paired_model(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "llama":
        model = tiny_llama()
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
        return model, torch.randint(0, 256, (8, 16), generator=g), linears(model, exclude=())
    if kind == "bert":
        model = tiny_bert()
        return model, torch.randint(0, 128, (8, 16), generator=g), linears(model)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    return model, torch.randn(8, 8, generator=g), linears(model)


@pytest.mark.parametrize("kind", ["llama", "bert", "sequential"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_cross_statistics_pair_the_reference_inputs_with_the_transformed_ones(kind,
                                                                             true_sequential):
    """With ``reference=``, each target's ``cross`` is X_refᵀX: its inputs in the untouched
    reference (blocks fed the reference's own block outputs) against its inputs in the model
    being transformed, token by token; ``gram`` is unchanged by the pairing."""
    import copy

    model, calib, targets = paired_model(kind)
    reference = copy.deepcopy(model)
    call = ((lambda m: lambda x: m(input_ids=x)) if kind != "sequential" else (lambda m: m))
    seen, plain = {}, {}
    twin = copy.deepcopy(model)
    calibrate_sequential(twin, calib, linears(twin, exclude=() if kind == "llama" else
                                              ("lm_head",)),
                         halve(plain), progress=Progress(), batch_size=4,
                         true_sequential=true_sequential)
    calibrate_sequential(model, calib, targets, halve(seen), progress=Progress(), batch_size=4,
                         true_sequential=true_sequential, reference=reference)
    assert set(seen) == set(targets)
    inputs = {}
    for name, m in (("ref", reference), ("out", model)):
        hs = [m.get_submodule(p).register_forward_hook(
            (lambda p, name: lambda mod, i, o: inputs.setdefault((name, p), []).append(
                i[0].reshape(-1, i[0].shape[-1]).double()))(p, name)) for p in targets]
        with torch.no_grad():
            for i in range(0, calib.shape[0], 4):
                call(m)(calib[i:i + 4])
        for h in hs:
            h.remove()
    for p in targets:
        assert seen[p].gram is not None and seen[p].cross is not None
        torch.testing.assert_close(seen[p].gram, plain[p].gram, rtol=0, atol=0)
        if not true_sequential:  # a block's later layers saw the untransformed earlier ones
            continue
        x_ref, x = torch.cat(inputs["ref", p]), torch.cat(inputs["out", p])
        torch.testing.assert_close(seen[p].cross, x_ref.T @ x, rtol=1e-5, atol=1e-5)
    assert all(plain[p].cross is None for p in plain)
    for p in targets:  # the reference is only read; the model was halved
        assert torch.equal(reference.get_submodule(p).weight, 2 * model.get_submodule(p).weight)


def test_blocks_and_groups_of_llama():
    model = tiny_llama(3)
    container, blocks = find_blocks(model, list(linears(model)))
    assert container == "model.layers" and blocks == [f"model.layers.{i}" for i in range(3)]
    order = []

    def transform(mods, stats):
        order.append(sorted(p.rsplit(".", 1)[1] for p in mods))
    calib = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    calibrate_sequential(model, calib, linears(model), transform, progress=Progress(),
                         true_sequential=True)
    assert order[:4] == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                         ["down_proj"]]
    assert len(order) == 12


def test_lm_head_outside_blocks_sees_transformed_blocks():
    model = tiny_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    targets = linears(model, exclude=())
    seen = {}
    calib = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))
    calibrate_sequential(model, calib, targets, halve(seen), progress=Progress())
    ref = reference_stats(model, ["lm_head"], calib, lambda x: model(input_ids=x))
    torch.testing.assert_close(seen["lm_head"].gram, ref["lm_head"].gram, rtol=1e-5, atol=1e-5)


def test_replacements_are_inserted():
    model = tiny_llama()
    calib = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))

    class Marked(nn.Linear):
        pass

    def transform(mods, stats):
        out = {}
        for p, m in mods.items():
            n = Marked(m.in_features, m.out_features, bias=m.bias is not None)
            n.load_state_dict(m.state_dict())
            out[p] = n
        return out
    calibrate_sequential(model, calib, linears(model), transform, progress=Progress())
    assert all(isinstance(m, Marked) for m in linears(model).values())


def test_stats_derived_quantities():
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[-1.0, 2.0], [1.0, 4.0]]])
    s = LinearStats(2)
    s.add(x)
    flat = x.reshape(-1, 2).double()
    assert s.tokens == 4 and s.samples == 2
    torch.testing.assert_close(s.mean(), flat.mean(0))
    torch.testing.assert_close(s.var(), flat.var(0, unbiased=False))
    torch.testing.assert_close(s.col_norms(), flat.norm(dim=0))
    torch.testing.assert_close(s.hessian(), (2 / 2 * flat.T @ flat).float())
    s2 = LinearStats(2, gram=False)
    s2.add(x)
    torch.testing.assert_close(s2.col_norms(), s.col_norms())
    with pytest.raises(ValueError):
        s2.hessian()


def test_gram_in_row_blocks_matches_the_whole_product(monkeypatch):
    # A wide layer's batch XᵀX is formed in row blocks (a 14336-wide one is 0.8 GB whole): the
    # same dot products, so the sums agree to float32 rounding of the block products.
    from surgery.passes.calib import stats as stats_mod

    torch.manual_seed(0)
    x = torch.randn(3, 40, 96)
    ref = torch.randn(3, 40, 96)  # a reference model's inputs (the cross sums, EoRA upstream)
    whole = LinearStats(96, cross=True)
    whole.add(x, paired=ref)
    whole.add(x[:1], paired=ref[:1])
    monkeypatch.setattr(stats_mod, "GRAM_BLOCK_BYTES", 4 * 96 * 10)  # 10 rows a block
    assert stats_mod.gram_row_blocks(96) == 10
    blocks = LinearStats(96, cross=True)
    blocks.add(x, paired=ref)
    blocks.add(x[:1], paired=ref[:1])
    torch.testing.assert_close(blocks.gram, whole.gram, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(blocks.cross, whole.cross, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(blocks.sq_sum, whole.sq_sum, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(blocks.sq_sum, blocks.gram.diagonal())
    assert (blocks.tokens, blocks.samples) == (whole.tokens, whole.samples)
    # a deferred (distributed) batch keeps its whole XᵀX, to be folded later
    deferred = LinearStats(96)
    deferred.defer()
    deferred.add(x)
    assert deferred.pending[0]["gram"].shape == (96, 96)


def test_take_hessian_converts_in_place_and_releases_half_the_buffer(monkeypatch):
    from surgery.passes.calib import stats as stats_mod

    monkeypatch.setattr(stats_mod, "_RELEASE_MIN_BYTES", 0)
    monkeypatch.setattr(stats_mod, "GRAM_BLOCK_BYTES", 8 * 1000)  # several conversion blocks
    torch.manual_seed(0)
    s = LinearStats(300)
    s.add(torch.randn(2, 50, 300))
    expected = s.hessian()
    buffer = s.gram.data_ptr()
    H = s.take_hessian()
    assert torch.equal(H, expected) and H.dtype == torch.float32 and H.is_contiguous()
    assert H.data_ptr() == buffer and s.gram is None  # written over the float64 sum
    H.add_(1)  # the result is an ordinary writable tensor


def test_sequence_var_is_the_dsnot_references_running_variance():
    # The reference feeds one sequence per batch and keeps a token-weighted running mean of each
    # batch's variance over its tokens; batches of several sequences here must give the same.
    torch.manual_seed(0)
    seqs = [torch.randn(1, t, 3) * (i + 1) + i for i, t in enumerate((5, 7, 4, 4))]
    var, ntok = None, 0
    for x in seqs:  # the reference's add_batch, transcribed
        v = x[0].T.var(dim=1, unbiased=False)
        var = v if ntok == 0 else (var * ntok + v * x.shape[1]) / (ntok + x.shape[1])
        ntok += x.shape[1]
    s = LinearStats(3, gram=False)
    s.add(seqs[0])
    s.add(seqs[1])
    s.add(torch.cat([seqs[2], seqs[3]]))  # one batch of two sequences of 4 tokens
    torch.testing.assert_close(s.sequence_var(), var.double())
    assert not torch.allclose(s.sequence_var(), s.var())  # it leaves out between-sequence spread


def test_hessian_helpers():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    x[:, 2] = 0
    H = 2 / 50 * x.T @ x
    W = torch.randn(3, 6)
    dead = dead_columns(H, W)
    assert dead.tolist() == [False, False, True, False, False, False]
    assert H[2, 2] == 1 and torch.all(W[:, 2] == 0)
    mean_diag = H.diagonal().mean()
    Hd = add_damping(H.clone(), 0.01)
    torch.testing.assert_close(Hd.diagonal() - H.diagonal(), (0.01 * mean_diag).expand(6))
    U = inverse_cholesky_upper(Hd)
    assert torch.equal(inverse_cholesky_upper(Hd.clone(), overwrite=True), U)  # in place, same
    assert torch.allclose(U, U.triu())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-4, atol=1e-4)
    W2, Hinv, dead2, perm = prepare_hessian(H.clone(), W.clone(), 0.01, act_order=True)
    assert torch.equal(W2, W[:, perm])
    d = H.diagonal()
    assert torch.all(d[perm][:-1] >= d[perm][1:])
