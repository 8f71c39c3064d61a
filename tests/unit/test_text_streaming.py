"""Streaming generated text: one callback per token, characters never split, chat prompts through the template."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from jupyter_swarm.client.chat import chat_input_ids, chat_messages, has_chat_template
from jupyter_swarm.client.streaming import INCOMPLETE, TextPieceStreamer
from jupyter_swarm.models import make_tiny_model

# accents, a symbol, an emoji and CJK: each is several bytes, which the tiny byte-level tokenizer splits over tokens
TEXT = "Café ☕ and 🎉 here\nnext line ünïcödé 日本語 done"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_model(str(tmp_path_factory.mktemp("streaming") / "tiny"), num_layers=1, hidden_size=32,
                           num_heads=2, num_kv_heads=1)
    return AutoTokenizer.from_pretrained(path)


def _stream(tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    pieces: list[str] = []
    streamer = TextPieceStreamer(tokenizer, pieces.append)
    streamer.put(torch.tensor([prompt or [1]]))  # generate() hands over the prompt first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return pieces


def test_pieces_are_whole_characters_one_per_token(tokenizer) -> None:
    ids = tokenizer(TEXT).input_ids
    assert any(INCOMPLETE in tokenizer.decode([i]) for i in ids), "the text must split characters over tokens"
    pieces = _stream(tokenizer, ids)
    assert len(pieces) == len(ids)  # one call per generated token (timings and token counts stay exact)
    assert "".join(pieces) == TEXT
    assert not any(INCOMPLETE in piece for piece in pieces)
    assert "" in pieces  # a token that only starts a character hands out nothing yet


def test_prompt_is_skipped_and_the_streamer_is_reusable(tokenizer) -> None:
    pieces: list[str] = []
    streamer = TextPieceStreamer(tokenizer, pieces.append)
    for text in ("Hello world", "again"):
        streamer.put(torch.tensor([tokenizer("the prompt").input_ids]))
        for token in tokenizer(text).input_ids:
            streamer.put(torch.tensor([token]))
        streamer.end()
        assert "".join(pieces) == text
        pieces.clear()


def test_a_character_cut_off_at_the_end_is_dropped_not_garbled(tokenizer) -> None:
    ids = tokenizer("ok 🎉").input_ids
    pieces = _stream(tokenizer, ids[:-1])  # the token limit cut the emoji's last byte off
    assert "".join(pieces) == "ok "


def test_batches_are_refused(tokenizer) -> None:
    streamer = TextPieceStreamer(tokenizer, print)
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put(torch.tensor([[1, 2], [3, 4]]))


def test_chat_messages_and_template(tokenizer) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert chat_messages("And now?", "Be brief.", history) == [
        {"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "And now?"}]
    assert chat_messages("Q", None)[0] == {"role": "user", "content": "Q"}
    assert not has_chat_template(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    try:
        assert has_chat_template(tokenizer)
        ids = chat_input_ids(tokenizer, chat_messages("What?", "Be brief."))
        assert ids.shape[0] == 1
        assert tokenizer.decode(ids[0]) == "<s>system: Be brief.</s><s>user: What?</s><s>assistant: "
    finally:
        tokenizer.chat_template = None
