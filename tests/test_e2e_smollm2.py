"""README command 1, end to end on the real SmolLM2-135M: int8 everywhere except lm_head,
perplexity rise below 1 %, and `surgery.load` reproduces the in-memory logits bit for bit."""

from pathlib import Path

import pytest
import torch

import surgery

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2_int8.surg"


@pytest.mark.slow
def test_readme_example_on_smollm2(tmp_path):
    prog = surgery.compile(EXAMPLE)
    out = tmp_path / "smollm2-int8"
    result = prog.apply(output=out)
    exp = result.report.expectations[0]
    assert exp.passed and exp.value / exp.original - 1 < 0.01
    step = result.report.steps[0]
    assert step.report.modules == 210
    loaded = surgery.load(out)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1950, 30, 2]])
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, loaded(ids).logits)
    # int8 weights on disk: about a quarter of the fp32 Linear bytes
    assert (out / "model.safetensors").stat().st_size < 260e6
