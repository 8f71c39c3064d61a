"""Generating for API requests through the swarm: one request at a time, text streamed as it is made."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jupyter_swarm.api.stops import StopScanner
from jupyter_swarm.errors import ConfigurationError

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256


class ModelBusyError(ConfigurationError):
    """The model is generating for someone else (e.g. the notebook) and cannot take this request now."""


@dataclass
class Sampling:
    """How to pick tokens: greedy when ``temperature`` is 0."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass
class Finished:
    """The end of a generation: why it stopped and how many tokens it took."""

    finish_reason: str  # "stop" (end of text or a stop sequence) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Generates text for prompts and chats with a distributed (or local) causal LM and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self._lock = threading.Lock()

    def prompt_ids(self, prompt: str) -> Any:
        """Token ids of a plain-text prompt (``/v1/completions``)."""
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def chat_ids(self, messages: list[dict[str, str]]) -> Any:
        """Token ids of a conversation through the model's chat template (``/v1/chat/completions``)."""
        from jupyter_swarm.client.chat import chat_input_ids, has_chat_template

        if not has_chat_template(self.tokenizer):
            raise ConfigurationError(f"model {self.model_name!r} has no chat template; use /v1/completions")
        return chat_input_ids(self.tokenizer, messages)

    def stream(self, input_ids: Any, sampling: Sampling) -> Iterator[str | Finished]:
        """Generate in a worker thread; yield text pieces as they become safe to show, then a :class:`Finished`.

        Closing the iterator early (the HTTP client went away) stops the generation after its current step.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        from jupyter_swarm.client.streaming import TextPieceStreamer

        if not self._lock.acquire(timeout=600):  # requests take turns: the model runs one session at a time
            raise ModelBusyError("the model is busy with other requests; try again later")
        items: queue.Queue[Any] = queue.Queue()
        scanner = StopScanner(sampling.stop)
        cancelled = threading.Event()
        counted = {"tokens": 0}

        class _Stop(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((ids.shape[0],), scanner.stopped or cancelled.is_set(), dtype=torch.bool)

        def on_text(piece: str) -> None:
            counted["tokens"] += 1
            safe = scanner.feed(piece)
            if safe:
                items.put(safe)

        def work() -> None:
            try:
                import torch

                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_tokens,
                                              do_sample=sampling.temperature > 0,
                                              streamer=TextPieceStreamer(self.tokenizer, on_text),
                                              stopping_criteria=StoppingCriteriaList([_Stop()]),
                                              pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
                if sampling.temperature > 0:
                    kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
                output = self.model.generate(input_ids, **kwargs)
                rest = scanner.finish()
                if rest:
                    items.put(rest)
                made = int(output.shape[1] - input_ids.shape[1])
                eos = self.tokenizer.eos_token_id
                ended = made > 0 and eos is not None and int(output[0, -1]) == eos
                reason = "stop" if scanner.stopped or ended or made < sampling.max_tokens else "length"
                items.put(Finished(reason, int(input_ids.shape[1]), made))
            except BaseException as e:  # noqa: BLE001 - handed to the request
                items.put(e)

        thread = threading.Thread(target=work, name="jupyter-swarm-api-generate", daemon=True)
        thread.start()
        try:
            while True:
                item = items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancelled.set()
            thread.join()
            self._lock.release()
