"""How the notebook turns a prompt into model input: a chat turn for models with a chat template, plain text else."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from jupyter_swarm.models import make_tiny_model
from jupyter_swarm.notebook.connection import SwarmConnection
from jupyter_swarm.notebook.generation import Generation

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture
def generation(tmp_path):
    path = make_tiny_model(str(tmp_path / "tiny"), num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1)
    connection = SwarmConnection()
    connection.tokenizer = AutoTokenizer.from_pretrained(path)
    return Generation(connection)


def test_plain_prompt_without_a_chat_template(generation) -> None:
    ids = generation.encode_prompt("Once upon a time")
    assert generation.connection.tokenizer.decode(ids[0]) == "Once upon a time"


def test_chat_turn_with_a_chat_template(generation) -> None:
    generation.connection.tokenizer.chat_template = TEMPLATE
    decode = generation.connection.tokenizer.decode
    assert decode(generation.encode_prompt("Hi")[0]) == \
        "<s>system: You are a helpful assistant.</s><s>user: Hi</s><s>assistant: "
    assert decode(generation.encode_prompt("Hi", system_prompt="Be brief.")[0]) == \
        "<s>system: Be brief.</s><s>user: Hi</s><s>assistant: "
    assert decode(generation.encode_prompt("Hi", system_prompt="")[0]) == "<s>user: Hi</s><s>assistant: "
    assert decode(generation.encode_prompt("Hi", chat=False)[0]) == "Hi"  # %swarm generate --raw
