"""Generating from a notebook: one request at a time in a background thread, text streamed as it comes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jupyter_swarm.notebook.connection import SwarmConnection


@dataclass
class GenerationResult:
    """What one generation produced and how fast."""

    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    token_times: list[float] = field(default_factory=list)
    route: list[tuple[str, int, int]] = field(default_factory=list)  # (peer id, start, end)
    stopped: bool = False
    error: str | None = None
    speculative: str = "off"  # how tokens were guessed ahead (jupyter_swarm.client.speculation)
    drafted: int = 0  # candidate tokens guessed
    accepted: int = 0  # of which the model kept

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted candidate tokens; None without speculative decoding."""
        return self.accepted / self.drafted if self.drafted else None

    def speculation_summary(self) -> str:
        """E.g. "speculative lookup: 71% of 140 guessed tokens accepted" ("" when off)."""
        if self.speculative == "off":
            return ""
        rate = self.acceptance_rate
        return (f"speculative {self.speculative}: "
                + (f"{100 * rate:.0f}% of {self.drafted} guessed tokens accepted" if rate is not None
                   else "no tokens guessed"))

    @property
    def tokens_per_second(self) -> float:
        gaps = self.gaps()
        return len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else 0.0

    @property
    def seconds_per_token(self) -> float:
        gaps = self.gaps()
        return sum(gaps) / len(gaps) if gaps else 0.0

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class Generation:
    """Generation through the connected model: streamed, stoppable, one request at a time."""

    def __init__(self, connection: SwarmConnection):
        self.connection = connection
        self.generating = False
        self.last_result: GenerationResult | None = None
        self.current: GenerationResult | None = None  # of the running generation, filled as tokens come
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def generate_stream(self, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                        top_p: float = 1.0, num_beams: int = 1, chat: bool | None = None,
                        system_prompt: str | None = None, speculative: str = "off") -> Iterator[str | GenerationResult]:
        """Generate in a background thread; yields text pieces as they arrive and finally the result.

        ``chat``: send ``prompt`` as a user message through the tokenizer's chat template, after
        ``system_prompt`` (default: a helpful assistant); None (the default) means "when the model has a chat
        template". False sends ``prompt`` as it is, to be continued. ``speculative``: ``off``, ``lookup[:K]`` or
        ``draft:PATH`` (:mod:`jupyter_swarm.client.speculation`); the result's acceptance rate says how it went.

        :meth:`stop_generation` (or closing the iterator, e.g. on KeyboardInterrupt) ends the request cleanly.
        """
        pieces: queue.Queue[Any] = queue.Queue()
        thread = self.start_generation(prompt, on_text=pieces.put, on_done=pieces.put, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, num_beams=num_beams, chat=chat,
                                       system_prompt=system_prompt, speculative=speculative)
        try:
            while True:
                item = pieces.get()
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            if thread.is_alive():
                self.stop_generation()
                thread.join()

    def start_generation(self, prompt: str, *, on_text: Callable[[str], None],
                         on_done: Callable[[GenerationResult], None], max_new_tokens: int = 32,
                         temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1, chat: bool | None = None,
                         system_prompt: str | None = None, speculative: str = "off") -> threading.Thread:
        """Start generating in a background thread; ``on_text`` gets pieces, ``on_done`` the result (``chat``,
        ``system_prompt`` and ``speculative`` as in :meth:`generate_stream`)."""
        from jupyter_swarm.errors import ConfigurationError
        from jupyter_swarm.options import parse_speculative

        model = self.connection.require_model()
        kind, _ = parse_speculative(speculative)
        if kind != "off" and num_beams > 1:
            raise ConfigurationError("speculative decoding works with one beam: use --num-beams 1 or --speculative off")
        if not self._lock.acquire(blocking=False):
            raise ConfigurationError("a generation is already running: stop it first")
        self._stop.clear()
        self.generating = True

        def work() -> None:
            result = self.current = GenerationResult(speculative=speculative.strip() if kind != "off" else "off")
            began = time.perf_counter()
            try:
                input_ids = self.encode_prompt(prompt, chat=chat, system_prompt=system_prompt)
                self._generate(model, input_ids, result, on_text, max_new_tokens, temperature, top_p, num_beams,
                               speculative)
            except Exception as e:  # noqa: BLE001 - shown to the user by the caller
                result.error = f"{type(e).__name__}: {e}"
            finally:
                result.seconds = time.perf_counter() - began
                result.stopped = self._stop.is_set()
                self.last_result = result
                self.generating = False
                self._lock.release()
                on_done(result)

        thread = threading.Thread(target=work, name="jupyter-swarm-generate", daemon=True)
        thread.start()
        return thread

    def encode_prompt(self, prompt: str, *, chat: bool | None = None, system_prompt: str | None = None) -> Any:
        """Token ids of ``prompt`` (``chat`` and ``system_prompt`` as in :meth:`generate_stream`)."""
        from jupyter_swarm.client.chat import DEFAULT_SYSTEM_PROMPT, chat_input_ids, chat_messages, has_chat_template

        tokenizer = self.connection.tokenizer
        if chat is None:
            chat = has_chat_template(tokenizer)
        if not chat:
            return tokenizer(prompt, return_tensors="pt").input_ids
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        return chat_input_ids(tokenizer, chat_messages(prompt, system))

    def _generate(self, model: Any, input_ids: Any, result: GenerationResult, on_text: Callable[[str], None],
                  max_new_tokens: int, temperature: float, top_p: float, num_beams: int, speculative: str) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        from jupyter_swarm.client.speculation import speculative_kwargs
        from jupyter_swarm.client.streaming import TextPieceStreamer

        stop = self._stop
        tokenizer = self.connection.tokenizer

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        def on_piece(piece: str) -> None:
            tokens = max(1, streamer.tokens_in_piece)  # tokens accepted together arrive together
            result.token_times.extend([time.perf_counter()] * tokens)
            result.tokens += tokens
            result.text += piece
            on_text(piece)

        streamer = TextPieceStreamer(tokenizer, on_piece)

        sampling = temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=num_beams,
                                      stopping_criteria=StoppingCriteriaList([_Stop()]),
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        if num_beams == 1:
            kwargs["streamer"] = streamer
        kwargs.update(speculative_kwargs(speculative, dtype=model.dtype))
        with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
            output = model.generate(input_ids, **kwargs)
            result.route = [(r.peer_id, r.start, r.end) for r in session.routes]
        if model.speculation is not None:
            result.drafted, result.accepted = model.speculation.drafted, model.speculation.accepted
        if num_beams > 1:  # beams finish together: show the winner at once
            text = tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)
            result.token_times.append(time.perf_counter())
            result.tokens = int(output.shape[1] - input_ids.shape[1])
            result.text = text
            on_text(text)

    def stop_generation(self) -> None:
        """End the current generation after its current step (the session closes cleanly)."""
        self._stop.set()
