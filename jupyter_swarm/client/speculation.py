"""Speculative decoding over the swarm: how a generate() call guesses tokens, and how often the guesses held.

transformers' assisted generation does the work (``assistant_model=`` or ``prompt_lookup_num_tokens=``): a cheap
guesser proposes several tokens, one step through the swarm checks them all, and the session steps back past the
first wrong one (:class:`jupyter_swarm.client.session_cache.SessionCache`). Each accepted guess saves a trip
through the chain of servers. This module turns a way to guess (``off``, ``lookup[:K]``, ``draft:PATH``, parsed
in :mod:`jupyter_swarm.options`) into generate() arguments, and counts what was proposed and accepted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.options import parse_speculative
from jupyter_swarm.wire.protocols import RELAY_MAX_TOKENS


@dataclass
class SpeculationStats:
    """What a speculative generate() call proposed and kept: ``drafted`` candidate tokens over ``rounds`` steps
    through the swarm, of which ``accepted`` matched what the model itself chose."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted candidates (None before any candidate)."""
        return self.accepted / self.drafted if self.drafted else None

    def watch(self, generator: Any) -> Any:
        """Count the candidates of a transformers candidate generator (patched on the instance; returned)."""
        get_candidates, update = generator.get_candidates, generator.update_candidate_strategy

        def counted_get_candidates(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            candidates, logits = get_candidates(input_ids, *args, **kwargs)
            self.drafted += candidates.shape[1] - input_ids.shape[1]
            self.rounds += 1
            return candidates, logits

        def counted_update(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: Any) -> Any:
            self.accepted += int(num_matches)
            return update(input_ids, scores, num_matches)

        generator.get_candidates = counted_get_candidates
        generator.update_candidate_strategy = counted_update
        return generator


def cap_candidates(generator: Any, max_length: int, max_candidates: int = RELAY_MAX_TOKENS - 1) -> Any:
    """Make a transformers candidate generator propose no token past ``max_length - 1`` and at most
    ``max_candidates`` at once (patched on the instance; returned). transformers' prompt lookup can propose up to K
    tokens past the end (it only cuts what it accepted afterwards): harmless for a local cache, but a server session
    is sized. A draft model's candidates grow while they hold; past ``max_candidates`` the check step (candidates +
    1 tokens) would be too big to relay server to server."""
    get_candidates = generator.get_candidates

    def capped(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        candidates, logits = get_candidates(input_ids, *args, **kwargs)
        room = max(0, min(max_candidates, max_length - 1 - input_ids.shape[1]))
        if candidates.shape[1] - input_ids.shape[1] > room:
            candidates = candidates[:, :input_ids.shape[1] + room]
            logits = None if logits is None else logits[:, :room]
        return candidates, logits

    generator.get_candidates = capped
    return generator


_drafts: dict[str, torch.nn.Module] = {}
_drafts_lock = threading.Lock()


def speculative_kwargs(mode: str | None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The generate() arguments of a speculative mode (see :func:`parse_speculative`); a draft model is loaded
    once per path (and dtype) and kept."""
    kind, value = parse_speculative(mode)
    if kind == "lookup":
        return {"prompt_lookup_num_tokens": value}
    if kind == "draft":
        return {"assistant_model": load_draft_model(str(value), dtype)}
    return {}


def load_draft_model(path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A small local causal LM (same tokenizer as the swarm's model) to draft candidates, loaded once."""
    from transformers import AutoModelForCausalLM

    key = f"{path}|{dtype}"
    with _drafts_lock:
        if key not in _drafts:
            try:
                _drafts[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            except (OSError, ValueError) as e:
                raise ConfigurationError(f"cannot load the draft model {path!r} ({e}); give the directory of a "
                                         "small causal LM that uses the same tokenizer as the swarm's model") from e
        return _drafts[key]
