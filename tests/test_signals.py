"""SIGINT and SIGTERM during `surgery apply`: exit 130 / 143, no temporary files, and a message
that names what was interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery import atomic


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


def _interrupt(tmp_path: Path, tiny_dir: Path, sig: int) -> tuple[int, str]:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    script = work / "s.surg"
    script.write_text(f'model base = "hf:{tiny_dir}"\n'
                      f'quantize type(Linear) - modules("lm_head") to int8\nsave "{out}"\n')
    env = {**os.environ, atomic.PAUSE_ENV: "60"}
    p = subprocess.Popen([sys.executable, "-m", "surgery.cli", "apply", str(script)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the artifact is written to its temporary directory, then interrupt.
        for line in p.stderr:
            if line.startswith("surgery-test-pause written"):
                break
        else:
            raise AssertionError("apply ended before the pause: " + p.stdout.read())
        assert [q for q in work.iterdir() if q.name.startswith(".out.tmp-")]
        p.send_signal(sig)
        rest = p.stderr.read()
        code = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    assert sorted(q.name for q in work.iterdir()) == ["s.surg"], "temporary files left"
    return code, rest


def test_sigterm_exits_143_and_cleans_up(tmp_path, tiny_dir):
    code, err = _interrupt(tmp_path, tiny_dir, signal.SIGTERM)
    assert code == 143
    assert "interrupted by SIGTERM while saving" in err and "no output was written" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigint_exits_130_and_cleans_up(tmp_path, tiny_dir):
    code, err = _interrupt(tmp_path, tiny_dir, signal.SIGINT)
    assert code == 130
    assert "interrupted by SIGINT while saving" in err and "Traceback" not in err
