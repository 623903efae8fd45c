"""examples/swap_then_lora.py, reduced: a stablemax swap breaks SmolLM2, a short LoRA fine-tune of
the adapters the same script attached wins most of the perplexity back (slow: real model)."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "swap_then_lora.py"


def _example():
    spec = importlib.util.spec_from_file_location("swap_then_lora", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_lora_fine_tune_recovers_perplexity_after_swap():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few minutes on one core; leaves the others to concurrent jobs
    try:
        r = _example().main("stablemax", steps=30, batch=4, eval_windows=8, log_every=10)
    finally:
        torch.set_num_threads(threads)
    # the swap hurts (reported by the swap step itself) ...
    assert r["perplexity_after_swap"] > 3 * r["perplexity_before"]
    # ... and 30 adapter-only steps bring it clearly down again
    assert r["perplexity_after_lora"] < 0.5 * r["perplexity_after_swap"]


def test_example_is_documented():
    text = EXAMPLE.read_text()
    assert text.startswith('"""') and "Takes:" in text
