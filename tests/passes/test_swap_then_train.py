"""examples/swap_then_train.surg, reduced: a StableMax swap breaks SmolLM2 (the swap step reports
it), and the script's own `train ... using distill(teacher=original)` wins most of it back
(slow: the real model)."""

from pathlib import Path

import pytest
import torch

import surgery

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "swap_then_train.surg"


def reduced(text: str, steps: int, windows: int) -> str:
    """The example with fewer steps and evaluation windows, and no save."""
    lines = [ln for ln in text.splitlines() if not ln.startswith(("save", "expect"))]
    out = "\n".join(lines).replace("for 200 steps", f"for {steps} steps")
    return out.replace("eval_windows=32", f"eval_windows={windows}") + "\n"


def test_example_reads_as_a_pure_script():
    text = EXAMPLE.read_text()
    assert "train adapters on calib for 200 steps using distill(teacher=original" in text
    steps = [s.verb for s in surgery.compile(text).check().steps]
    assert steps == ["swap", "adapt", "train", "save"]


@pytest.mark.slow
def test_distillation_recovers_perplexity_after_the_swap():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # minutes on one core; leaves the others to concurrent jobs
    try:
        result = surgery.compile(reduced(EXAMPLE.read_text(), 20, 8)).apply(seed=0)
    finally:
        torch.set_num_threads(threads)
    steps = {s.verb: s.report.metrics for s in result.report.steps}
    before, swapped = steps["swap"]["perplexity_before"], steps["swap"]["perplexity_after"]
    assert swapped > 3 * before  # the swap hurts ...
    from surgery.data import corpus
    from surgery.evaluate import perplexity
    from surgery.models import load_model

    tok = load_model("zoo:smollm2-135m").tokenizer
    data = corpus(tok, "pydoc", samples=256, seqlen=128, eval_windows=8)
    healed = perplexity(result.model, data.evaluation)
    assert healed < 0.5 * swapped  # ... and 20 distillation steps bring it clearly down
