"""The task-vector merges as one sparsify x consensus x combine pass: hand-computed values of the
combinations mergekit users rely on, rows that are only defaults, and refused combinations."""

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from surgery.passes.merge.common import MergeParams, merge_state_dicts, tensor_seed
from surgery.passes.merge.dare import dare_drop
from surgery.passes.merge.recipe import TaskVectorParams
from surgery.passes.merge.stream import stream_merge
from surgery.passes.merge.taskvector import ROWS, TaskVectorMerger, combine_deltas
from surgery.registry import get_pass

D = torch.float64
# The spec's task vectors (specs/merging.md 5.3), one row per model, base 0.
T = torch.tensor([[0.5, -0.1, 0.3, 0, -0.7, 0.2], [-0.4, 0.2, 0.1, 0.6, -0.1, -0.3],
                  [0.1, 0.3, -0.2, -0.5, -0.6, 0.05]], dtype=D)


def merged(method, rows=T, seed=0, kind="other", base=None, **kw):
    """Merge one tensor `w` of models whose task vectors are `rows` (base 0 unless given)."""
    P = get_pass("merge", method)
    names = [f"m{i}" for i in range(len(rows))]
    merger = P.merger_cls(P.Params(models=names, base="b", **kw), seed=seed)
    b = torch.zeros_like(rows[0]) if base is None else base
    sd, _ = merge_state_dicts(merger, {"w": b}, [{"w": b + r} for r in rows], {"w": kind})
    return sd["w"]


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=D), atol=1e-6, rtol=0)


def same_bits(a, b):
    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --- consensus=ties: sum (mergekit's dare_ties) or mean of the agreeing deltas -------------
# Column sums 0.2, 0.4, 0.2, 0.1, -1.4, -0.05 elect + + + + - -; a 0 never agrees.

def test_dare_ties_sums_the_agreeing_deltas():
    close(merged("dare_ties", p=0.0), [0.6, 0.5, 0.4, 0.6, -1.4, -0.3])


def test_dare_ties_can_average_them_and_the_old_spelling_still_does():
    want = [0.3, 0.25, 0.2, 0.6, -1.4 / 3, -0.3]
    close(merged("dare_ties", p=0.0, combine="mean"), want)
    close(merged("dare", p=0.0, consensus="ties", combine="mean"), want)
    close(merged("dare", p=0.0, combine="ties"), want)  # DARE's older `combine=ties`


def test_weighted_consensus_follows_mergekit():
    """Signs are elected on w_i * tau_i (column sums 0.7, 0.3, 0.5, 0.1, -2.1, 0.15: the last
    column flips to +); mean divides by the weights of the agreeing models."""
    w = [2.0, 1.0, 1.0]
    close(merged("dare_ties", p=0.0, weights=w), [1.1, 0.5, 0.7, 0.6, -2.1, 0.45])
    mean = [1.1 / 3, 0.25, 0.7 / 3, 0.6, -2.1 / 4, 0.15]
    close(merged("dare_ties", p=0.0, weights=w, combine="mean"), mean)
    # TIES at density 1 runs the chunked (lean) executor: the same weighted mean.
    close(merged("ties", density=1.0, weights=w), mean)


def test_lean_ties_with_weights_equals_the_stacked_formula(monkeypatch):
    import surgery.passes.merge.ties as ties_mod
    from surgery.passes.merge.ties import ties_lean

    monkeypatch.setattr(ties_mod, "CHUNK", 1000)  # several chunk boundaries
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3500, generator=g, dtype=D)
    ts = [base + torch.randn(3500, generator=g, dtype=D).round(decimals=1) for _ in range(3)]
    w = [0.5, 2.0, -1.0]
    for how in ("mean", "sum", "max"):
        r = get_pass("merge", "ties").Params(density=0.3, combine=how).recipe
        Th = ties_mod.trim_topk(torch.stack([t - base for t in ts]), 0.3)
        assert torch.equal(ties_lean(base, ts, 0.3, "exact", how, w),
                           combine_deltas(Th, None, w, r))


# --- sparsify -----------------------------------------------------------------------------

def test_magnitude_without_consensus_is_trimmed_task_arithmetic():
    # Top 3 of 6 magnitudes per row, then the plain sum.
    close(merged("task_arithmetic", sparsify="magnitude", density=0.5),
          [0.1, 0.3, 0.3, 0.1, -1.3, -0.3])


def test_dare_rescale_choices():
    """One model, so the merge is the dropped task vector itself: the same mask for every
    choice (same seed), survivors kept (false), times 1/(1-p) (`dare`'s true) or times
    ||tau||_1 / ||kept||_1 (`dare_linear`'s true, mergekit)."""
    tau = torch.randn(1, 4000, generator=torch.Generator().manual_seed(1))  # float32: exact
    drop = 1.0 - 0.4
    plain = merged("dare", tau, seed=5, density=0.4, rescale=False)
    kept = plain != 0
    assert 0.35 < kept.double().mean() < 0.45
    assert torch.equal(plain[kept], tau[0][kept])
    assert torch.equal(merged("dare", tau, seed=5, density=0.4, rescale=True),
                       plain / (1.0 - drop))
    l1 = merged("dare_linear", tau, seed=5, density=0.4, rescale=True)
    assert torch.equal(l1 != 0, kept)
    torch.testing.assert_close(l1.abs().sum(), tau.abs().sum())
    torch.testing.assert_close(l1, plain * (tau.abs().sum() / plain.abs().sum()))
    # The mask is drawn per (tensor, model) seed: the one the streamed engine uses too.
    g = torch.Generator().manual_seed(tensor_seed(5, "w", 0))
    assert torch.equal(plain, dare_drop(tau[0], drop, "none", g))


def test_pcb_weights_can_be_summed_instead_of_averaged():
    # sum_i Tc_i * scale_i with the spec's golden clipped values and balance weights (5.5).
    close(merged("pcb", ratio=0.5, combine="sum"),
          [0.5 * 0.122107, 0.3 * 0.020409, 0, 0.4, -0.5 - 0.1 * 0.025343 - 0.5, 0])


def test_widen_scale_multiplies_the_weighted_task_vectors():
    W0 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]], dtype=D)
    W1 = torch.tensor([[1.1, 0.0, 2.0], [0.0, 1.0, 2.5]], dtype=D)
    W2 = torch.tensor([[1.0, 0.5, 2.0], [0.2, 1.0, 2.0]], dtype=D)
    out = merged("widen", [W1 - W0, W2 - W0], base=W0, kind="matrix", scale=0.5)
    # spec 4.x golden merge [[1.045871, 0.5, 2], [0.108257, 1, 2.5]], its delta halved
    close(out, [[1.0229355, 0.25, 2.0], [0.0541285, 1.0, 2.25]])


# --- rows are defaults of one pass ---------------------------------------------------------

def test_rows_share_one_pass_and_one_base_declaration():
    for row in ROWS:
        P = get_pass("merge", row.method)
        assert P.merger_cls is TaskVectorMerger and issubclass(P.Params, TaskVectorParams)
        r = P.Params().recipe
        assert (r.sparsify, r.consensus, r.combine) == (row.sparsify, row.consensus, row.combine)
    declared = [c for c in (MergeParams, TaskVectorParams, *(get_pass("merge", r.method).Params
                                                             for r in ROWS))
                if "needs_base" in c.__dict__]
    assert declared == [MergeParams, TaskVectorParams]


def tiny_sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(24, 16, generator=g), "a.bias": torch.randn(24, generator=g),
            "e.weight": torch.randn(10, 16, generator=g)}


@pytest.mark.parametrize("one,other", [
    (("ties", {}), ("task_arithmetic", {"sparsify": "magnitude", "density": 0.2,
                                        "consensus": "ties", "combine": "mean"})),
    (("dare", {"combine": "ties"}), ("dare_ties", {"combine": "mean",
                                                   "rescale": "inverse_keep_prob"})),
    (("dare", {"rescale": True}), ("dare_linear", {"rescale": "inverse_keep_prob", "p": 0.5})),
    (("dare_linear", {}), ("dare", {"rescale": "l1_match"})),
    (("pcb", {}), ("task_arithmetic", {"sparsify": "pcb", "combine": "mean"})),
    (("widen", {}), ("task_arithmetic", {"combine": "widen"})),
    (("task_arithmetic", {"normalize": True}), ("task_arithmetic", {"combine": "mean"})),
    (("ties", {"disjoint": "sum"}), ("ties", {"normalize": False})),
])
def test_spellings_of_one_point_give_the_same_bits(one, other):
    base, ms = tiny_sd(0), [tiny_sd(1), tiny_sd(2), tiny_sd(3)]
    kinds = {"a.weight": "matrix", "e.weight": "embedding"}
    outs = []
    for method, kw in (one, other):
        P = get_pass("merge", method)
        merger = P.merger_cls(P.Params(models=["x", "y", "z"], base="b", **kw), seed=11)
        outs.append(merge_state_dicts(merger, base, ms, kinds)[0])
    for k in base:
        same_bits(outs[0][k], outs[1][k])


def test_streamed_dare_ties_equals_in_memory(tmp_path):
    sds = [tiny_sd(i) for i in range(3)]
    for i, sd in enumerate(sds):
        (tmp_path / f"m{i}").mkdir()
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"))
    kw = {"density": 0.6, "weights": [0.7, 0.3]}
    stream_merge("dare_ties", [tmp_path / "m1", tmp_path / "m2"], tmp_path / "out",
                 base=tmp_path / "m0", seed=4, **kw)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    P = get_pass("merge", "dare_ties")
    merger = P.merger_cls(P.Params(models=["x", "y"], base="b", **kw), seed=4)
    want, _ = merge_state_dicts(merger, sds[0], sds[1:], {"a.weight": "matrix",
                                                          "e.weight": "embedding"})
    for k in want:
        same_bits(got[k], want[k])


# --- refused combinations --------------------------------------------------------------------

@pytest.mark.parametrize("method,kw,msg", [
    ("dare", {"p": 0.3, "density": 0.7}, "set the same fraction"),
    ("ties", {"inter": "paper_softmax"}, "applies only with sparsify=pcb"),
    ("task_arithmetic", {"density": 0.5}, "applies only with sparsify=magnitude|dare|pcb"),
    ("dare", {"t": 2.0}, "applies only with combine=widen"),
    ("dare", {"combine": "ties", "consensus": "none"}, "contradicts consensus=none"),
    ("task_arithmetic", {"combine": "max"}, "needs consensus=ties"),
    ("widen", {"weights": [1.0, 2.0]}, "drop `weights`"),
    ("ties", {"sparsify": "pcb", "combine": "widen"}, "does not compose"),
    ("ties", {"disjoint": "sum", "combine": "mean"}, "write only `combine`"),
    ("dare", {"scope": "global"}, "use scope=per_tensor"),
    ("pcb", {"density": 0.0}, "must be > 0"),
])
def test_contradictions_are_validation_errors(method, kw, msg):
    with pytest.raises(ValidationError, match=msg):
        get_pass("merge", method).Params(models=["x", "y"], base="b", **kw)


def test_dare_ties_in_a_script(tmp_path):
    import surgery
    from surgery.diagnostics import SurgeryError
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     vocab_size=32)).save_pretrained(tmp_path / name)
    head = "".join(f'model {n} = "hf:{tmp_path / n}"\n' for n in ("base", "a", "b"))
    res = [surgery.compile(head + f"merge a, b into base using {call}\n").apply()
           for call in ("dare(density=0.5, consensus=ties, rescale=true)",
                        "dare_ties(density=0.5, rescale=inverse_keep_prob)")]
    sds = [r.model.state_dict() for r in res]
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in sds[0].items())
    for k in sds[0]:
        assert torch.equal(sds[0][k], sds[1][k]), k
    with pytest.raises(SurgeryError, match="set the same fraction"):
        surgery.compile(head + "merge a, b into base using dare(p=0.5, density=0.5)\n").check()
