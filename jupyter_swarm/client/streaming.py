"""Streaming generated text token by token, without ever splitting a character."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.generation.streamers import BaseStreamer

INCOMPLETE = "\ufffd"  # what a tokenizer decodes half of a multi-byte character to


class TextPieceStreamer(BaseStreamer):
    """A ``generate(streamer=...)`` streamer that calls ``on_text(piece)`` once per generated token (or group of
    tokens accepted together, see ``tokens_in_piece``).

    ``piece`` is the text that token completes. Tokens are decoded together with the tokens before them on the
    same line and only the new part is emitted, so a character whose bytes span several tokens (accents in some
    tokenizers, emoji, CJK) comes out whole, with the token that completes it; until then the piece is "". This is
    finer than transformers' ``TextStreamer`` (which waits for whole words) so that per-token timings stay exact.

    Only batch size 1 is supported, as in transformers' streamers (``generate`` streams nothing for beam search).
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None], *, skip_prompt: bool = True,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.skip_special_tokens = skip_special_tokens
        self.skip_prompt = skip_prompt
        self._skip_next = skip_prompt  # generate() first hands over the prompt
        self._line_ids: list[int] = []
        self._emitted = 0  # characters of the current line's text already handed out
        # tokens the piece being handed out completes: more than one when generate() accepts several at once
        # (speculative decoding)
        self.tokens_in_piece = 0

    def put(self, value: Any) -> None:
        """Take the next token (or, first, the prompt) from ``generate``."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextPieceStreamer supports batch size 1 only")
        if self._skip_next:
            self._skip_next = False
            return
        self.tokens_in_piece = value.numel()
        self._line_ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self._line_ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(INCOMPLETE):  # part of a character: wait for the token that completes it
            self.on_text("")
            return
        piece = text[self._emitted:]
        if text.endswith("\n"):  # start a new line: decoding cost stays proportional to the line, not the text
            self._line_ids, self._emitted = [], 0
        else:
            self._emitted = len(text)
        self.on_text(piece)

    def end(self) -> None:
        """Generation finished. A character cut off by the token limit is dropped rather than shown as U+FFFD;
        every complete character was already handed out."""
        self._line_ids, self._emitted, self._skip_next = [], 0, self.skip_prompt  # ready for the next generate()
