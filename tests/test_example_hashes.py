"""Refactorings keep every example's output bytes: re-run each example and compare the sha256 of
what it writes with tests/data/example_hashes.json (made by benchmarks/example_hashes.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = json.loads((ROOT / "tests" / "data" / "example_hashes.json").read_text())
RECORDED = sorted(n for n, e in BASELINE.items() if "outputs" in e)


def test_every_example_has_a_baseline_entry():
    examples = {p.stem for p in (ROOT / "examples").glob("*.surg")}
    assert examples == set(BASELINE), "re-run benchmarks/example_hashes.py --out ..."
    for name, entry in BASELINE.items():  # each entry has hashes or says why it has none
        kinds = set(entry) - {"seconds"}
        assert len(kinds) == 1 and kinds <= {"outputs", "skipped", "not_recorded"}, name


@pytest.mark.slow
@pytest.mark.parametrize("name", RECORDED)
def test_example_outputs_are_byte_identical(name, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import example_hashes
    finally:
        sys.path.pop(0)
    skip = example_hashes.why_skipped(name, tmp_path)
    if skip:
        pytest.skip(skip)
    out = tmp_path / "hashes.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "example_hashes.py"),
                           "--workdir", str(tmp_path), "--out", str(out), name],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())[name]
    assert got.get("outputs") == BASELINE[name]["outputs"], got
