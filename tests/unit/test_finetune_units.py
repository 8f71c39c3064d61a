"""Client-side fine-tuning pieces that need no swarm: batch chunking, prompt shapes, adapter loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from jupyter_swarm.client.batching import chunk_rows
from jupyter_swarm.client.tuning import PromptTuning
from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import get_family, load_model_config, make_tiny_model
from jupyter_swarm.runtime.adapters import ServedAdapters
from jupyter_swarm.wire.protocols import MAX_BATCH_SIZE, MAX_BATCH_TOKENS


def test_chunk_rows_covers_the_batch_within_the_limits():
    assert chunk_rows(5, 9, 24) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_rows(3, 10) == [(0, 3)]
    chunks = chunk_rows(1000, 8)
    assert chunks[0] == (0, MAX_BATCH_SIZE) and chunks[-1][1] == 1000
    assert all((e - s) * 100 <= MAX_BATCH_TOKENS for s, e in chunk_rows(400, 100))
    assert chunk_rows(2, MAX_BATCH_TOKENS * 2) == [(0, 1), (1, 2)]  # one row too long: the server will say so


def test_prompt_tuning_shapes():
    deep = PromptTuning("deep_ptune", 4, num_blocks=6, hidden_size=8)
    assert deep.prompt_embeddings.shape == (4, 8) and deep.intermediate_prompts.shape == (5, 4, 8)
    prompts = deep.block_prompts(torch.float32)
    assert prompts.shape == (6, 1, 4, 8) and not prompts[0].any()
    assert PromptTuning("ptune", 2, num_blocks=6, hidden_size=8).block_prompts(torch.float32) is None
    with pytest.raises(ConfigurationError, match="pre_seq_len >= 1"):
        PromptTuning("ptune", 0, num_blocks=6, hidden_size=8)


def test_adapter_loading_errors(tmp_path):
    path = make_tiny_model(str(tmp_path / "tiny"), family="llama", hidden_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1)
    family = get_family(load_model_config(path))
    with pytest.raises(ConfigurationError, match="no adapter_config.json"):
        ServedAdapters.load([str(tmp_path / "nowhere")], family, 2, dtype=torch.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (bad / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="only LoRA"):
        ServedAdapters.load([f"x={bad}"], family, 2, dtype=torch.float32)
    with pytest.raises(ConfigurationError, match="must be 1-200"):
        ServedAdapters.load([f"bad name={bad}"], family, 2, dtype=torch.float32)
    with pytest.raises(Exception, match="not served here"):
        ServedAdapters().check("anything")
    ServedAdapters().check(None)
