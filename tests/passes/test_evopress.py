"""EvoPress (prune / quantize / drop), OWL: exact budgets, determinism, resume, drop's
re-indexed checkpoint, and located errors. Tiny models; the SmolLM2 numbers are in
benchmarks/evopress.py and docs/bench/evopress.md."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from surgery.diagnostics import SurgeryError
from surgery.models import LoadedModel
from surgery.passes.evo.owl import owl_sparsities
from surgery.passes.evo.search import (Infeasible, SearchConfig, Stage, average, group_by_size,
                                       initial_state, mutate, run_search)
from surgery.passes.prune import SparseLinear
from surgery.passes.quantize.qlinear import QuantLinear

# -- the search itself (pure) -------------------------------------------------------------------

SIZES = [100] * 7 + [40] * 5 + [300] * 4  # three groups of equal-sized units
BITS = [2.0, 3.0, 4.0, 8.0]


def _sum(state, sizes, values):
    return sum(Fraction(values[lv]).limit_denominator(10 ** 6) * s for lv, s in zip(state, sizes))


def test_mutations_keep_the_budget_exact_with_uneven_levels():
    rng = random.Random(0)
    state = initial_state(SIZES, BITS, 3)
    assert state == [1] * len(SIZES)  # 3 is a level: uniform start
    want = _sum(state, SIZES, BITS)
    groups = group_by_size(SIZES)
    seen_8 = False
    for _ in range(500):
        child = mutate(state, groups, BITS, rng)
        assert child is not None and child != state
        assert _sum(child, SIZES, BITS) == want  # exact, not approximately
        for g in groups:  # and inside each group of equal sizes
            assert sum(BITS[child[u]] for u in g) == sum(BITS[state[u]] for u in g)
        seen_8 |= 3 in child
        state = child
    assert seen_8  # a 4 -> 8 raise (paid by four 1-bit lowers) does happen


def test_start_meets_a_budget_between_levels_exactly():
    even = [100] * 6 + [40] * 4
    state = initial_state(even, BITS, 3.5)
    assert average(state, even, BITS) == 3.5
    with pytest.raises(Infeasible):  # 7 equal units cannot average 3.5 with whole bits
        initial_state(SIZES, BITS, 3.5)
    pct = [10.0 * i for i in range(10)]
    state = initial_state([576 * 576] * 4 + [1536 * 576] * 6, pct, 65)
    assert average(state, [576 * 576] * 4 + [1536 * 576] * 6, pct) == pytest.approx(65, abs=0)


@pytest.mark.parametrize("target, levels", [(3, [4.0, 8.0]), (9, BITS), (30, [0.0, 90.0])])
def test_infeasible_budgets_are_refused(target, levels):
    with pytest.raises(Infeasible):
        initial_state([10] * 4, levels, target)


def _toy_fitness(weights):
    """A noisy separable loss: the search should move bits to the heavy units."""
    def fitness(state, batch):
        noise = sum(i * 1e-4 + n * 1e-7 for i, n in batch)
        return sum(w * 2.0 ** (-BITS[lv]) for w, lv in zip(weights, state)) + noise
    return fitness


def test_search_is_deterministic_improves_and_resumes(tmp_path):
    weights = [1 + 9 * (i % 3 == 0) for i in range(len(SIZES))]
    start = initial_state(SIZES, BITS, 3)
    cfg = SearchConfig(generations=12, offspring=6, stages=(Stage(2, 64), Stage(1, 128)), seed=7)
    a = run_search(start, SIZES, BITS, 8, 32, _toy_fitness(weights), cfg)
    b = run_search(start, SIZES, BITS, 8, 32, _toy_fitness(weights), cfg)
    assert a.state == b.state
    assert [h["fitness"] for h in a.history] == [h["fitness"] for h in b.history]
    assert _toy_fitness(weights)(a.state, []) < _toy_fitness(weights)(start, [])
    assert average(a.state, SIZES, BITS) == 3
    # interrupted after 5 generations, then resumed to 12: the same end point
    ck = tmp_path / "ck.json"
    half = SearchConfig(generations=5, offspring=6, stages=cfg.stages, seed=7)
    run_search(start, SIZES, BITS, 8, 32, _toy_fitness(weights), half, checkpoint=ck)
    assert json.loads(ck.read_text())["generation"] == 5
    c = run_search(start, SIZES, BITS, 8, 32, _toy_fitness(weights), cfg, checkpoint=ck)
    assert c.resumed_from == 5 and c.state == a.state
    assert [h["fitness"] for h in c.history] == [h["fitness"] for h in a.history]


def test_owl_sparsities_average_the_target_and_follow_outliers():
    s = owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.6, 0.08)
    assert sum(s) / 4 == pytest.approx(0.6, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[3] == min(s) and s[0] == max(s)  # most outliers -> least pruned


# -- through the compiler, on a tiny LLaMA -----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from surgery.models import load_model

    return load_model("zoo:smollm2-135m").tokenizer


def subject(tokenizer, layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                      tie_word_embeddings=True)
    return LoadedModel(LlamaForCausalLM(cfg).eval(), "python:tiny", tokenizer=tokenizer,
                       config=cfg.to_dict())


HEAD = """\
model base  = "zoo:smollm2-135m"
data  calib = corpus("pydoc", samples=4, seqlen=64)
let body = modules("model.layers.*")
"""
FAST = "generations=3, offspring=3, survivors=[2, 1], tokens=[32, 64], fitness_samples=4"


def _levels(result, key):
    rep = result.report.steps[0].report
    return {p: v[key] for p, v in rep.per_module.items()}


def test_prune_evopress_average_is_exact_and_saved_with_chart(tokenizer, tmp_path):
    out = tmp_path / "m"
    r = surgery.apply(subject(tokenizer), HEAD + (
        f"prune body to 60% using evopress(levels=[40%, 60%, 80%], "
        f"method=sparsegpt(block=32), data=calib, {FAST})\n" f'save "{out}"\n'))
    model = r.model
    lins = {n: m for n, m in model.named_modules() if n.startswith("model.layers.")
            and isinstance(m, nn.Linear)}
    assert lins and all(isinstance(m, SparseLinear) for m in lins.values())
    levels = _levels(r, "sparsity_level")
    total = sum(m.weight.numel() for m in lins.values())
    # the levels average exactly 60 over the parameters ...
    assert sum(levels[n] * m.weight.numel() for n, m in lins.items()) == 60 * total
    # ... and so do the masks, to the rounding of each row's count
    zeros = sum(int((~m.weight_mask).sum()) for m in lins.values())
    assert abs(zeros / total - 0.6) <= len(lins) * 64 / total
    png = (out / "evopress-sparsity_level.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "surgery.json").read_text())
    assert "evopress" in json.dumps(manifest) and '"sparsity_level"' in json.dumps(manifest)


@pytest.mark.slow  # four searches; the search's own determinism and resume are tested above
def test_prune_evopress_seed_determinism_and_resume(tokenizer, tmp_path):
    def run(extra):
        return _levels(surgery.apply(subject(tokenizer), HEAD + (
            "prune body to 60% using evopress(levels=[40%, 60%, 80%], method=wanda, "
            f"data=calib, generations=4, offspring=3, survivors=[2, 1], tokens=[32, 64], "
            f"fitness_samples=4{extra})\n")), "sparsity_level")

    a, b = run(", seed=3"), run(", seed=3")
    assert a == b
    ck = tmp_path / "ck.json"
    part = HEAD + ("prune body to 60% using evopress(levels=[40%, 60%, 80%], method=wanda, "
                   "data=calib, generations=2, offspring=3, survivors=[2, 1], tokens=[32, 64], "
                   f'fitness_samples=4, seed=3, checkpoint="{ck}")\n')
    surgery.apply(subject(tokenizer), part)
    assert json.loads(ck.read_text())["generation"] == 2
    c = run(f', seed=3, checkpoint="{ck}"')
    assert c == a


def test_quantize_evopress_bits_average_is_exact(tokenizer, tmp_path):
    out = tmp_path / "q"
    r = surgery.apply(subject(tokenizer), HEAD + (
        f"quantize body to int3 using evopress(levels=[2, 3, 4, 8], method=gptq(group=32), "
        f'data=calib, {FAST})\nsave "{out}"\n'))
    q = {n: m for n, m in r.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(q) == 4 * 7
    assert {m.bits for m in q.values()} <= {2, 3, 4, 8}
    total = sum(m.in_features * m.out_features for m in q.values())
    assert sum(m.bits * m.in_features * m.out_features for m in q.values()) == 3 * total
    assert r.report.steps[0].report.metrics["average_bits"] == 3
    # the mixed widths save and load back as they were
    loaded = surgery.load(out)
    for n, m in q.items():
        assert loaded.get_submodule(n).bits == m.bits
        torch.testing.assert_close(loaded.get_submodule(n).dequantized_weight(),
                                   m.dequantized_weight())


@pytest.mark.parametrize("method", ["cosine(data=calib)", f"evopress(data=calib, {FAST})"])
def test_drop_reindexes_and_loads_in_transformers(tokenizer, tmp_path, method):
    out = tmp_path / "dropped"
    r = surgery.apply(subject(tokenizer), HEAD + f"drop 2 of body using {method}\n"
                      f'save "{out}"\n')
    model = r.model
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    dropped = r.report.steps[0].report.metrics["dropped"]
    assert len(dropped) == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    plain = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = plain(input_ids=ids, use_cache=False).logits
        # KV-cache decoding works after renumbering (layer_idx indexes the cache)
        plain.generate(ids, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got, want)
    # the kept blocks are the original ones, in order
    orig = subject(tokenizer).model
    kept = [i for i in range(4) if i not in dropped]
    for new, old in enumerate(kept):
        torch.testing.assert_close(plain.model.layers[new].mlp.up_proj.weight,
                                   orig.model.layers[old].mlp.up_proj.weight)


def test_cosine_drops_the_blocks_that_change_least(tokenizer):
    lm = subject(tokenizer)
    with torch.no_grad():  # make block 2 nearly an identity: it must be the one dropped
        for p in (lm.model.model.layers[2].self_attn.o_proj.weight,
                  lm.model.model.layers[2].mlp.down_proj.weight):
            p.mul_(1e-4)
    r = surgery.apply(lm, HEAD + "drop 1 of body using cosine(data=calib)\n")
    rep = r.report.steps[0].report
    assert rep.metrics["dropped"] == [2]
    cos = {p: v["cosine"] for p, v in rep.per_module.items()}
    assert max(cos, key=cos.get) == "model.layers.2"


# -- located errors ------------------------------------------------------------------------------


def _error(tokenizer, line, layers=4):
    with pytest.raises(SurgeryError) as e:
        surgery.apply(subject(tokenizer, layers), HEAD + line + "\n")
    return e.value.diagnostics


def test_infeasible_bits_budget_is_located_at_the_levels(tokenizer):
    line = "quantize body to int3 using evopress(levels=[4, 8], data=calib)"
    (d,) = _error(tokenizer, line)
    assert d.code == "E0301" and "infeasible budget" in d.message
    start = len(HEAD) + line.index("levels")
    assert d.span.start == start


def test_levels_outside_2_to_8_bits(tokenizer):
    (d,) = _error(tokenizer, "quantize body to int4 using evopress(levels=[1, 4, 8], data=calib)")
    assert d.code == "E0301" and "from 2 to 8" in d.message


def test_budget_the_layer_sizes_cannot_meet_is_e0330(tokenizer):
    (d,) = _error(tokenizer, 'prune modules("model.layers.0.self_attn.*") to 30% using '
                             "evopress(levels=[0%, 90%], data=calib)")
    assert d.code == "E0330" and "cannot average exactly 30" in d.message


def test_dropping_more_blocks_than_selected_is_e0331(tokenizer):
    (d,) = _error(tokenizer, "drop 4 of body using cosine(data=calib)")
    assert d.code == "E0331" and "matches 4 blocks" in d.message and d.help


def test_drop_needs_blocks_and_a_count(tokenizer):
    (d,) = _error(tokenizer, 'drop 1 of modules("model.layers.0.mlp") using cosine(data=calib)')
    assert d.code == "E0401"
    (d,) = _error(tokenizer, "drop 0 of body using cosine(data=calib)")
    assert d.code == "E0301"


def test_evopress_rejects_nm_and_unknown_inner_methods(tokenizer):
    (d,) = _error(tokenizer, "prune body to 2:4 using evopress(data=calib)")
    assert "average sparsity" in d.message
    (d,) = _error(tokenizer, "prune body to 50% using evopress(method=dsnot, data=calib)")
    assert d.code == "E0301" and "cannot build the levels" in d.message


def test_search_starts_from_the_uniform_layer_sequential_result(tokenizer):
    """With the budget on a level, the database leaves each layer at that level while the next
    blocks calibrate, so generation 0 is exactly uniform SparseGPT (same masks, same weights)."""
    evo = surgery.apply(subject(tokenizer), HEAD + (
        "prune body to 60% using evopress(levels=[40%, 60%, 80%], method=sparsegpt(block=32), "
        "data=calib, generations=0, fitness_samples=2)\n")).model
    uni = surgery.apply(subject(tokenizer), HEAD + (
        "prune body to 60% using sparsegpt(block=32, data=calib)\n")).model
    for (n, a), (_, b) in zip(evo.named_modules(), uni.named_modules()):
        if isinstance(a, SparseLinear):
            assert torch.equal(a.weight_mask, b.weight_mask), n
            assert torch.equal(a.weight, b.weight), n
