"""Loading spans and client parts: only the needed tensors, every checkpoint layout, helpful errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import jupyter_swarm.models.checkpoint as checkpoint_module
from jupyter_swarm.errors import ConfigurationError, UnsupportedModelError
from jupyter_swarm.models import BlockSpan, ClientHead, get_family, load_model_config, supported_model_types
from jupyter_swarm.models.bloom import BloomFamily
from jupyter_swarm.models.llama import LlamaFamily


@pytest.fixture
def read_log(monkeypatch):
    """Names of the checkpoint tensors read, and the files opened, while the test runs."""
    log = {"tensors": [], "files": []}
    real_safe_open = checkpoint_module.safe_open

    class LoggingSafeOpen:
        def __init__(self, path, *args, **kwargs):
            log["files"].append(os.path.basename(path))
            self._inner = real_safe_open(path, *args, **kwargs)

        def __enter__(self):
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._file.keys()

        def get_tensor(self, name):
            log["tensors"].append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr(checkpoint_module, "safe_open", LoggingSafeOpen)
    return log


def test_sharded_span_reads_only_its_blocks(tiny, reference, layers_io, read_log):
    path = tiny("llama-8-sharded")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 4  # really sharded

    span = BlockSpan.load(path, 3, 5)

    wanted = {name for name in index["weight_map"] if name.startswith(("model.layers.3.", "model.layers.4."))}
    assert set(read_log["tensors"]) == wanted == set(span.checkpoint_names)
    assert set(read_log["files"]) <= {index["weight_map"][name] for name in wanted}
    assert len(span.blocks) == 2 and span.num_blocks == 2
    assert sorted({key.split(".")[1] for key in span.state_dict()}) == ["0", "1"]
    model = reference(path)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert sum(p.numel() for p in span.parameters()) == 2 * per_block

    ids = torch.randint(4, 400, (1, 6))
    with torch.no_grad():
        block_input, block_output = layers_io(model, ids, 3, 5)
        torch.testing.assert_close(span(block_input), block_output, atol=1e-5, rtol=1e-5)


def test_client_head_reads_only_client_parts(tiny, read_log):
    path = tiny("llama-8-sharded")
    head = ClientHead.load(path)
    assert sorted(read_log["tensors"]) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert head.num_blocks == 8 and head.hidden_size == 64 and head.vocab_size == head.config.vocab_size


@pytest.mark.parametrize("name", ["llama-tied", "bloom"])
def test_tied_lm_head_shares_the_embeddings(name, tiny):
    head = ClientHead.load(tiny(name))
    assert head.config.tie_word_embeddings
    assert head.lm_head.weight is head.embeddings.weight
    assert (head.embeddings_norm is not None) == (name == "bloom")


def _copy_config_and_tokenizer(src: str, dst) -> None:
    os.makedirs(dst, exist_ok=True)
    for file_name in os.listdir(src):
        if file_name.endswith(".json") and not file_name.startswith("model."):
            shutil.copy(os.path.join(src, file_name), dst)


def test_pytorch_bin_checkpoint(tiny, reference, tmp_path):
    path = tiny("llama")
    model = reference(path)
    _copy_config_and_tokenizer(path, tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    span = BlockSpan.load(str(tmp_path), 1, 3)
    expected = BlockSpan.load(path, 1, 3)
    for (name, mine), (_, theirs) in zip(span.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(mine, theirs), name
    assert torch.equal(ClientHead.load(str(tmp_path)).lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("name,base", [("llama", "model"), ("bloom", "transformer")])
def test_checkpoint_saved_without_the_base_model_prefix(name, base, tiny, reference, tmp_path):
    """e.g. bigscience/bloom-560m names its tensors "h.0..." and "word_embeddings..." (saved from BloomModel)."""
    path = tiny(name)
    model = reference(path)
    _copy_config_and_tokenizer(path, tmp_path)
    state = {k: v.contiguous() for k, v in getattr(model, base).state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    span = BlockSpan.load(str(tmp_path), 2, 4)
    expected = BlockSpan.load(path, 2, 4)
    hidden = torch.randn(1, 3, span.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(span(hidden), expected(hidden), atol=0, rtol=0)
    if model.config.tie_word_embeddings:  # without lm_head.weight, the head needs tied embeddings
        head = ClientHead.load(str(tmp_path))
        assert torch.equal(head.norm.weight, ClientHead.load(path).norm.weight)


def test_dtype_defaults_to_the_checkpoint_dtype(tiny, tmp_path):
    from jupyter_swarm.models import make_tiny_model

    path = make_tiny_model(str(tmp_path / "bf16"), dtype=torch.bfloat16, num_layers=2)
    span = BlockSpan.load(path, 0, 2)
    assert span.dtype == torch.bfloat16 and next(span.parameters()).dtype == torch.bfloat16
    assert ClientHead.load(path).dtype == torch.bfloat16
    wide = BlockSpan.load(path, 0, 1, dtype=torch.float32)
    assert wide.dtype == torch.float32 and next(wide.parameters()).dtype == torch.float32
    with torch.no_grad():
        out = span(torch.randn(1, 3, 64))  # float32 in, float32 out, bfloat16 inside
    assert out.dtype == torch.float32
    assert span.cache_bytes(1, 10) == BlockSpan.load(path, 0, 2, dtype=torch.float32).cache_bytes(1, 10) // 2


@pytest.mark.parametrize("start,end", [(-1, 2), (2, 2), (3, 1), (0, 5), (4, 5)])
def test_out_of_range_span(start, end, tiny):
    with pytest.raises(ConfigurationError, match="has 4 blocks"):
        BlockSpan.load(tiny("llama"), start, end)


def test_unsupported_model_type(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bert'.*llama"):
        load_model_config(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        BlockSpan.load(str(tmp_path), 0, 1)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "made-up-lm"}))
    with pytest.raises(UnsupportedModelError, match="'made-up-lm'.*bloom, llama, mistral, qwen2"):
        load_model_config(str(tmp_path))


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not a directory and not a reachable hub id"):
        load_model_config(str(tmp_path / "nowhere"))
    with pytest.raises(UnsupportedModelError, match="without a config.json"):
        ClientHead.load(str(tmp_path))


def test_missing_weights(tiny, tmp_path):
    _copy_config_and_tokenizer(tiny("llama"), tmp_path)
    with pytest.raises(ConfigurationError, match="no weights found"):
        BlockSpan.load(str(tmp_path), 0, 1)
    save_file({"model.layers.0.input_layernorm.weight": torch.ones(64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigurationError, match="lacks tensors of block 0: model.layers.0.self_attn"):
        BlockSpan.load(str(tmp_path), 0, 1)
    with pytest.raises(ConfigurationError, match="no tensors of block 1"):
        BlockSpan.load(str(tmp_path), 1, 2)


def test_registry(tiny):
    assert supported_model_types() == ["bloom", "llama", "mistral", "qwen2"]
    assert isinstance(get_family(load_model_config(tiny("mistral"))), LlamaFamily)
    assert isinstance(get_family(load_model_config(tiny("bloom"))), BloomFamily)
