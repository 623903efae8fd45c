"""Fuzzing the front end: mutants of the example scripts go through `check` and `plan` (binding on
weightless skeletons included). The pass condition for every mutant is a program or a located
SurgeryError, within a CPU-time budget; anything else (a traceback, a hang) fails.

Mutations are grammar-aware (on tokens: delete, duplicate, swap, replace with a token of the same
kind from adversarial pools, insert grammar tokens, deep nesting, long operator chains, huge
numbers) and byte-level (random bytes, including invalid UTF-8, which must be located by the script
reader). The default run is FUZZ_DEFAULT mutants; `-m slow` runs FUZZ_SLOW (docs/reliability.md
has the figures).
"""

from __future__ import annotations

import random
import re
import time
import traceback
from pathlib import Path

import pytest

from surgery.api import Program
from surgery.diagnostics import SurgeryError
from surgery.fastparse import _TOKEN
from surgery.scriptfile import read_script

FUZZ_DEFAULT = 2000
FUZZ_SLOW = 10_000
BUDGET_CPU_S = 2.0  # per mutant, check + plan; CPU time of this thread, so machine load does not count

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.surg"))
SEEDS = [p.read_text() for p in EXAMPLES] + [
    'model base = "zoo:smollm2-135m"\ndata calib = corpus("pydoc", samples=8, seqlen=64)\n'
    'let mlp = modules("model.layers.*.mlp.*_proj") | re("lm_.*") & type(Linear) - modules("x")\n'
    'prune mlp to 2:4 using wanda(data=calib)\nquantize mlp to int4 using gptq(group=64, data=calib)\n'
    'swap softmax in type(LlamaAttention) for softplus(reweight=true, p=15)\n'
    'adapt modules("**.q_proj") with lora(r=8, alpha=16, init=eva(data=calib))\n'
    'merge adapters in mlp\nlower stablemax, int4_linear to triton in mlp\n'
    'expect perplexity(calib) <= 1.10 * original\nexport onnx "out/m.onnx"\nsave "out/m"\n',
    'model enc = "zoo:minilm-l6"\ndata calib = corpus("pydoc", samples=4, seqlen=64)\n'
    'quantize type(Linear) to int8\nexpect cosine(calib) >= 0.99\n',
]
POOLS = {
    "word": ["modules", "re", "type", "Linear", "calib", "base", "original", "to", "in", "using",
             "true", "false", "data", "model", "let", "save", "rtn", "gptq", "wanda", "int4",
             "int8", "x" * 300, "perplexity", "samples", "seqlen", "group"],
    "number": ["0", "1", "2", "64", "0.5", "1e-3", "1e999", "9" * 50, "9" * 4301, "10000000000",
               ".5", "1."],
    "string": ['"**"', '"' + ".".join(["**"] * 40) + '"', '"(.*)*x"', '"(.*){1,32000}[bc]"',
               '"model.("', '""', '"hf:/nonexistent"', '"zoo:nope"', '"/"', '"\\x00"',
               '"zoo:smollm2-135m"', '"model.layers.*.mlp.*"', '"' + "*" * 200 + '"'],
    "compare": ["<=", ">=", "==", "<", ">"],
    "punct": list("()[],=:%|&+-*/"),
}
GRAMMAR_TOKENS = [t for pool in POOLS.values() for t in pool if len(t) < 60] + [
    "\n", "\n  ", "#", "prune", "quantize", "swap", "adapt", "merge", "lower", "export", "surgery",
    "expect", "2:4", "50%", "into", "with", "for"]
BYTES = [b"\x00", b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\r", b"\t", b"\x0b", b"\x1c",
         b"\xe2\x80\xa8", b"'", b'"', b"\\", b"(", b"[", b"\n"]


def tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            out.append(("other", text[pos]))
            pos += 1
            continue
        out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def grammar_mutant(rng: random.Random, text: str) -> str:
    toks = tokens(text)
    for _ in range(rng.choice([1, 1, 1, 2, 4])):
        if not toks:
            break
        i = rng.randrange(len(toks))
        kind, value = toks[i]
        op = rng.random()
        if op < 0.1:
            del toks[i]
        elif op < 0.15:
            toks.insert(i, toks[i])
        elif op < 0.2:
            j = rng.randrange(len(toks))
            toks[i], toks[j] = toks[j], toks[i]
        elif op < 0.6 and kind in POOLS:  # same kind of token: mostly still parses
            toks[i] = (kind, rng.choice(POOLS[kind]))
        elif op < 0.7:
            toks.insert(i, ("ins", rng.choice(GRAMMAR_TOKENS) + rng.choice(["", " "])))
        elif op < 0.85:  # deep nesting around a token
            k = rng.choice([3, 50, 99, 101, 300, 600])
            opener, closer = rng.choice([("(", ")"), ("[", "]"), ("f(", ")"), ("-", "")])
            toks[i] = (kind, opener * k + value + closer * k)
        else:  # a long operator chain
            k = rng.choice([10, 17, 200, 600])
            op_ = rng.choice([" | ", " & ", " + ", " - ", " * "])
            toks[i] = (kind, op_.join([value] * k))
    return "".join(v for _, v in toks)


def byte_mutant(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(data) + 1)
        op = rng.random()
        if op < 0.5:
            data[pos:pos] = rng.choice(BYTES)
        elif op < 0.8:
            del data[pos:pos + rng.randint(1, 8)]
        else:
            data[pos:pos + 1] = bytes([rng.randrange(256)])
    return bytes(data)


@pytest.fixture(scope="module")
def skeletons():
    """The zoo skeletons, built once (the real architectures on the meta device)."""
    from surgery.models import load_skeleton

    return {s: load_skeleton(s, structural=False) for s in ("zoo:smollm2-135m", "zoo:minilm-l6")}


def located(e: SurgeryError) -> bool:
    # E0205 (no model to bind to) and E0602/E0600 about an input named on the command line
    # have no statement to point at; every other diagnostic carries a span.
    return bool(e.diagnostics) and all(
        d.code and d.message and (d.span is not None or d.code in ("E0205",))
        for d in e.diagnostics)


def run_one(text: str, skeletons, outcome: dict | None = None) -> str | None:
    """None if the mutant passes, else a description of the failure. ``outcome`` counts
    'checked' (a program), 'bound' (a plan on a skeleton) and 'error' (a located SurgeryError)."""
    t0 = time.thread_time()
    result = "checked"
    try:
        prog = Program(text, "fuzz.surg")
        checked = prog.check()
        subject = checked.subject.source if checked.subject is not None else None
        if subject in skeletons:
            prog.plan(skeletons[subject])
            result = "bound"
        elif subject is not None and not subject.startswith("zoo:"):
            prog.plan()  # hf: paths (missing in the examples) and unknown schemes
            result = "bound"
    except SurgeryError as e:
        result = "error"
        e.render()
        if not located(e):
            return f"unlocated diagnostic {[(d.code, d.message) for d in e.diagnostics]}"
    except Exception:  # noqa: BLE001 - the thing this test looks for
        return "traceback:\n" + traceback.format_exc(limit=6)
    spent = time.thread_time() - t0
    if spent > BUDGET_CPU_S:
        return f"over budget: {spent:.2f} s CPU"
    if outcome is not None:
        outcome[result] = outcome.get(result, 0) + 1
    return None


def run_bytes(data: bytes, tmp: Path) -> str | None:
    p = tmp / "fuzz.surg"
    p.write_bytes(data)
    try:
        read_script(p)
    except SurgeryError as e:
        if e.diagnostics[0].code == "E0106" and e.diagnostics[0].span is None:
            return "undecodable script without a location"
    except Exception:  # noqa: BLE001
        return "traceback:\n" + traceback.format_exc(limit=6)
    return None


def fuzz(n: int, seed: int, skeletons, tmp: Path) -> tuple[list[str], dict]:
    rng = random.Random(seed)
    failures, stats = [], {"mutants": 0, "max_cpu_s": 0.0}
    for i in range(n):
        seed_text = rng.choice(SEEDS)
        if rng.random() < 0.75:
            text = grammar_mutant(rng, seed_text)
        else:
            data = byte_mutant(rng, seed_text)
            problem = run_bytes(data, tmp)
            if problem:
                failures.append(f"mutant {i} (bytes {data[:200]!r}...): {problem}")
            text = data.decode("utf-8", errors="replace")
        t0 = time.thread_time()
        problem = run_one(text, skeletons, stats)
        stats["max_cpu_s"] = max(stats["max_cpu_s"], time.thread_time() - t0)
        stats["mutants"] += 1
        if problem:
            failures.append(f"mutant {i} ({text[:300]!r}...): {problem}")
    return failures, stats


def test_examples_pass_unmutated(skeletons, tmp_path):
    for text in SEEDS:
        assert run_one(text, skeletons) is None


def test_fuzz_default(skeletons, tmp_path):
    failures, stats = fuzz(FUZZ_DEFAULT, 15, skeletons, tmp_path)
    assert not failures, f"{len(failures)} failing mutants; first:\n" + "\n\n".join(failures[:3])


@pytest.mark.slow
def test_fuzz_slow(skeletons, tmp_path):
    t0 = time.perf_counter()
    failures, stats = fuzz(FUZZ_SLOW, 2026, skeletons, tmp_path)
    print(f"fuzz: {stats['mutants']} mutants in {time.perf_counter() - t0:.0f} s, "
          f"max {stats['max_cpu_s']:.3f} s CPU per mutant, {len(failures)} failures")
    assert not failures, f"{len(failures)} failing mutants; first:\n" + "\n\n".join(failures[:3])


def test_budget_catches_a_slow_case(skeletons, monkeypatch):
    """The budget is real: a front end made slow on purpose fails the condition."""
    import surgery.parser

    real = surgery.parser.parse

    def slow_parse(*a, **k):
        t = time.thread_time()
        while time.thread_time() - t < BUDGET_CPU_S + 0.2:
            pass
        return real(*a, **k)

    monkeypatch.setattr("surgery.api.parse", slow_parse)
    assert run_one("let x = modules(\"a\")\n", skeletons).startswith("over budget")


def test_tokenizer_round_trips():
    for text in SEEDS:
        assert "".join(v for _, v in tokens(text)) == text
    assert re.fullmatch(r"[\x00-\x7f]*", "".join(GRAMMAR_TOKENS))
