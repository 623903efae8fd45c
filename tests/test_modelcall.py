"""surgery.modelcall: the one rule for feeding a model token ids and reading its output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from surgery.modelcall import ModelKind, first_output, forward_ids, model_kwargs, takes_use_cache


class _Recorder(nn.Module):
    """An HF-like model (config with a vocabulary) that records how it was called."""

    def __init__(self, with_cache: bool):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=10, architectures=None)
        self.emb = nn.Embedding(10, 3)
        self.calls: list[tuple[tuple, dict]] = []
        if with_cache:
            self.forward = self._forward_cache  # type: ignore[method-assign]

    def forward(self, input_ids=None):
        self.calls.append(((), {"input_ids": input_ids}))
        return SimpleNamespace(logits=self.emb(input_ids))

    def _forward_cache(self, input_ids=None, use_cache=True):
        self.calls.append(((), {"input_ids": input_ids, "use_cache": use_cache}))
        return SimpleNamespace(logits=self.emb(input_ids))


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval()


def test_kinds_of_live_models(tiny_llama):
    assert ModelKind.of(tiny_llama) is ModelKind.CAUSAL_LM  # no `architectures`: by class name
    assert ModelKind.of(_bert()) is ModelKind.ENCODER
    assert ModelKind.of(nn.Linear(3, 4)) is ModelKind.MODULE
    # a config without a vocabulary is not an HF language model
    odd = nn.Linear(3, 4)
    odd.config = SimpleNamespace(hidden_size=3)
    assert ModelKind.of(odd) is ModelKind.MODULE
    assert [k.takes_ids for k in ModelKind] == [True, True, False]


def test_kinds_from_config_dicts():
    assert ModelKind.from_config({"architectures": ["LlamaForCausalLM"]}) == "causal-lm"
    assert ModelKind.from_config({"architectures": ["BertModel"]}) == "encoder"
    assert ModelKind.from_config({}) == "encoder"
    assert ModelKind.from_config(None) == "module"


def test_causal_lm_gets_input_ids_without_cache_and_returns_logits(tiny_llama):
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    assert takes_use_cache(tiny_llama) and model_kwargs(tiny_llama) == {"use_cache": False}
    out = forward_ids(tiny_llama, ids)
    assert getattr(out, "past_key_values", None) is None  # no cache was built
    with torch.no_grad():
        expected = tiny_llama(input_ids=ids, use_cache=False).logits
        cached = tiny_llama(input_ids=ids).logits  # the cache never changes a single pass
    got = first_output(out)
    assert got.shape == (2, 7, 256)
    assert torch.equal(got, expected) and torch.equal(got, cached)


def test_encoder_returns_last_hidden_state():
    bert = _bert()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = first_output(forward_ids(bert, ids))
        expected = bert(input_ids=ids).last_hidden_state
    assert torch.equal(got, expected)


def test_use_cache_only_when_the_signature_takes_it():
    ids = torch.tensor([[1, 2, 3]])
    plain = _Recorder(with_cache=False)
    forward_ids(plain, ids)
    assert list(plain.calls[0][1]) == ["input_ids"]
    cached = _Recorder(with_cache=True)
    forward_ids(cached, ids)
    assert cached.calls[0][1]["use_cache"] is False


def test_plain_module_gets_its_input_positionally():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(2, 4)
    assert torch.equal(first_output(forward_ids(net, x)), net(x))


def test_extra_kwargs_reach_the_model(tiny_llama):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        out = forward_ids(tiny_llama, ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers: the kwarg was passed


def test_first_output_unwraps_every_shape():
    t = torch.ones(2)
    assert first_output(t) is t
    assert first_output((t, "cache")) is t
    assert first_output([t]) is t
    assert first_output(SimpleNamespace(logits=t, last_hidden_state=torch.zeros(2))) is t
    assert first_output(SimpleNamespace(last_hidden_state=t)) is t
    with pytest.raises(TypeError, match="dict"):
        first_output({"a": t})
