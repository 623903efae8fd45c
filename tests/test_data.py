"""Calibration/evaluation data: deterministic, and the two splits never overlap."""

import pytest
import torch

from surgery.data import corpus, split_stream, text_file
from surgery.diagnostics import SurgeryError


class CharTokenizer:
    """A stand-in tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 4096 for c in text]}


def test_corpus_is_deterministic_and_splits_are_disjoint():
    a = corpus(CharTokenizer(), "pydoc", samples=16, seqlen=128, seed=3)
    b = corpus(CharTokenizer(), "pydoc", samples=16, seqlen=128, seed=3)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.evaluation, b.evaluation)
    c = corpus(CharTokenizer(), "pydoc", samples=16, seqlen=128, seed=4)
    assert not torch.equal(a.calibration, c.calibration)
    assert a.calibration.shape == (16, 128) and a.evaluation.shape[1] == 128


def test_splits_are_disjoint_by_position():
    ids = torch.arange(10_000)
    ds = split_stream(ids, name="x", samples=64, seqlen=100, seed=0)
    assert int(ds.calibration.max()) < int(ds.evaluation.min())
    assert ds.evaluation.numel() == 1000  # the last 10 %, whole windows


def test_text_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello world. " * 500)
    ds = text_file(CharTokenizer(), p, samples=4, seqlen=64)
    assert ds.calibration.shape == (4, 64)
    with pytest.raises(SurgeryError) as e:
        text_file(CharTokenizer(), tmp_path / "missing.txt")
    assert e.value.codes == ["E0602"]


def test_too_short_text(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny")
    with pytest.raises(SurgeryError) as e:
        text_file(CharTokenizer(), p, seqlen=64)
    assert e.value.codes == ["E0700"]
