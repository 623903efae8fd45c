"""Shared fixtures: tiny random models (fast) and the real offline models (slow tests)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; the variable must be set before triton is
    # first imported by any test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama_config(**over):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
               tie_word_embeddings=True)
    cfg.update(over)
    return LlamaConfig(**cfg)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.eval()
    return model


def tiny_tokenizer():
    """A 256-token byte-level BPE trained on pydoc text (fits the tiny models' vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from surgery.data import pydoc_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([pydoc_text()[:50_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A tiny LLaMA saved as an HF directory (config.json + model.safetensors + tokenizer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smollm2():
    from surgery.models import load_model

    return load_model("zoo:smollm2-135m")
