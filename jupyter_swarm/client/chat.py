"""Turning a user's message into model input with the tokenizer's chat template (instruct models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` carries a chat template (an instruct model), so prompts should be chat messages."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(prompt: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                  history: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    """The message list for one more user turn: the system prompt (if any), earlier turns, then ``prompt``."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, *history, {"role": "user", "content": prompt}]


def chat_input_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Any:
    """Token ids (shape 1 x length) of ``messages`` formatted by the chat template, ending with the assistant's
    turn opened, ready for ``generate``."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]
