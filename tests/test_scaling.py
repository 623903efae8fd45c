"""Time bombs of issue 15: checking is linear in script length, globs with many `**` and
catastrophic regular expressions bind (or are refused) in well under a second. Times are CPU
seconds of this thread, so a loaded machine does not make them flaky."""

from __future__ import annotations

import time

import pytest

from surgery.api import Program
from surgery.diagnostics import SurgeryError

HEADER = 'model base = "zoo:smollm2-135m"\n'


def script(n: int) -> str:
    return HEADER + "".join(
        f'let s{i} = modules("model.layers.{i % 30}.mlp.*_proj") | re("lm_head") - type(Embedding)\n'
        for i in range(n))


def check_cpu(text: str) -> float:
    t = time.thread_time()
    prog = Program(text, "big.surg")
    prog.check()
    spent = time.thread_time() - t
    del prog  # freeing a million AST objects is not checking (about 1 s for 50,000 lines)
    return spent


def test_check_time_is_linear_in_script_length():
    check_cpu(script(200))  # warm-up (grammar, registry)
    small, large = check_cpu(script(2000)), check_cpu(script(8000))
    # 4x the lines: linear is ~4x, the old quadratic span computation was ~16x.
    assert large / small < 7, (small, large)


@pytest.mark.slow
def test_50000_line_script_checks_in_under_5_s():
    text = script(50_000)
    check_cpu(script(100))
    assert check_cpu(text) < 5.0


@pytest.fixture(scope="module")
def smollm2_skeleton():
    from surgery.models import load_skeleton

    return load_skeleton("zoo:smollm2-135m")


def plan_cpu(text: str, skeleton) -> tuple[float, SurgeryError | None]:
    prog = Program(HEADER + text, "s.surg")
    prog.check()
    t = time.thread_time()
    try:
        prog.plan(skeleton)
        err = None
    except SurgeryError as e:
        err = e
    return time.thread_time() - t, err


def test_40_double_star_segments_bind_in_under_1_s(smollm2_skeleton):
    glob = ".".join(["**"] * 40) + ".mlp.up_proj"
    spent, err = plan_cpu(f'quantize modules("{glob}") to int8\n', smollm2_skeleton)
    assert err is None and spent < 1.0


def test_catastrophic_regex_is_refused_in_under_1_s(smollm2_skeleton):
    spent, err = plan_cpu('quantize re("(.*){1,32000}[bc]") to int8\n', smollm2_skeleton)
    assert spent < 1.0
    d = err.diagnostics[0]
    assert d.code == "E0404" and d.span.line == 2 and d.span.col == 10
    spent, err = plan_cpu('quantize re("(.*)*x") to int8\n', smollm2_skeleton)
    assert spent < 1.0 and err.diagnostics[0].code == "E0400"  # fast, and matches nothing


def _recursive_reference(pattern: list[str], path: list[str]) -> bool:
    """The former backtracking matcher: obviously right, exponential in `**` segments."""
    import fnmatch

    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_recursive_reference(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and \
        _recursive_reference(pattern[1:], path[1:])


def test_glob_matching_agrees_with_the_backtracking_reference():
    import random

    from surgery.selectors import glob_match

    rng = random.Random(0)
    segs = ["model", "layers", "0", "1", "mlp", "up_proj"]
    pats = segs + ["*", "**", "**", "m*", "?", "*_proj", "[01]"]
    for _ in range(5000):
        name = ".".join(rng.choice(segs) for _ in range(rng.randint(0, 6)))
        pattern = ".".join(rng.choice(pats) for _ in range(rng.randint(1, 5)))
        want = _recursive_reference(pattern.split("."), name.split(".") if name else [])
        assert glob_match(pattern, name) == want, (pattern, name)
