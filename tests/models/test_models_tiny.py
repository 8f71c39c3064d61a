"""make_tiny_model: offline, fast, reproducible, idempotent, with a working tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import make_tiny_model
from jupyter_swarm.models.tiny import MARKER


def test_tokenizer_round_trips_text(tiny):
    path = tiny("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    text = "Hello swarm! The quick brown fox, 123."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # it learned merges
    assert config.vocab_size == len(tokenizer)
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (0, 1, 2, 3)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)


def test_idempotent_and_reproducible(tmp_path):
    path = make_tiny_model(str(tmp_path / "m"), seed=5)
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert make_tiny_model(str(tmp_path / "m"), seed=5) == path
    assert os.stat(weights).st_mtime_ns == stamp  # not rebuilt

    from safetensors.torch import load_file

    again = make_tiny_model(str(tmp_path / "again"), seed=5)
    first, second = load_file(weights), load_file(os.path.join(again, "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    make_tiny_model(path, seed=6)  # other arguments: rebuilt in place
    assert not torch.equal(load_file(weights)["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert sorted(os.listdir(tmp_path)) == ["again", "m"]  # no build leftovers


def test_vocab_size_pads_or_caps_the_tokenizer(tmp_path):
    padded = make_tiny_model(str(tmp_path / "padded"), vocab_size=1000, num_layers=1)
    assert AutoConfig.from_pretrained(padded).vocab_size == 1000
    assert len(AutoTokenizer.from_pretrained(padded)) <= 1000
    small = make_tiny_model(str(tmp_path / "small"), vocab_size=120, num_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(small)
    assert len(tokenizer) <= 120 == AutoConfig.from_pretrained(small).vocab_size
    assert tokenizer.decode(tokenizer("the cat sat").input_ids) == "the cat sat"
    with pytest.raises(ConfigurationError, match="too small"):
        make_tiny_model(str(tmp_path / "tiny"), vocab_size=10, num_layers=1)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="refusing"):
        make_tiny_model(str(tmp_path))
    assert not os.path.exists(tmp_path / MARKER)


def test_unknown_family(tmp_path):
    with pytest.raises(ConfigurationError, match="llama, mistral, qwen2, bloom"):
        make_tiny_model(str(tmp_path / "x"), family="gpt2")
