"""Speculative decoding's client pieces: modes, the session cache transformers crops, the replay inputs cut back."""

from __future__ import annotations

import pytest
import torch

from jupyter_swarm.client.inference import _SpanSession
from jupyter_swarm.client.session_cache import SessionCache
from jupyter_swarm.client.speculation import SpeculationStats, cap_candidates
from jupyter_swarm.options import DEFAULT_LOOKUP_TOKENS, parse_speculative
from jupyter_swarm.errors import ConfigurationError


@pytest.mark.parametrize("mode, parsed", [
    (None, ("off", None)), ("off", ("off", None)), ("lookup", ("lookup", DEFAULT_LOOKUP_TOKENS)),
    ("lookup:3", ("lookup", 3)), ("draft:/models/small", ("draft", "/models/small")),
])
def test_speculative_modes(mode, parsed):
    assert parse_speculative(mode) == parsed


@pytest.mark.parametrize("mode", ["on", "lookup:0", "lookup:64", "lookup:x", "draft:", "off:1"])
def test_a_bad_speculative_mode_says_what_the_modes_are(mode):
    with pytest.raises(ConfigurationError, match=r"unknown speculative mode .*lookup\[:K\].*draft:PATH"):
        parse_speculative(mode)


def test_replay_inputs_are_cut_back_chunk_by_chunk():
    span = _SpanSession(route=None, stream=None)  # type: ignore[arg-type]
    chunks = [torch.arange(5.0), torch.arange(5.0, 8.0), torch.arange(8.0, 12.0)]
    span.history = [c.view(1, -1, 1) for c in chunks]
    span.truncate(7)
    assert span.inputs().flatten().tolist() == list(range(7))
    span.truncate(7)
    assert span.inputs().shape[1] == 7
    span.truncate(0)
    assert span.inputs() is None


class _FakeSession:
    def __init__(self, position: int):
        self.position = position

    def rollback(self, position: int) -> None:
        assert 0 <= position <= self.position
        self.position = position


def test_session_cache_crops_the_session_and_hides_prompt_positions():
    session = _FakeSession(position=12)
    cache = SessionCache(session, offset=2)  # 2 trainable prompt positions, 10 tokens
    assert cache.get_seq_length() == 10 and cache.is_croppable and not cache.is_compileable
    cache.crop(-3)
    assert session.position == 9 and cache.get_seq_length() == 7
    cache.crop(0)  # nothing to drop
    assert session.position == 9
    cache.crop(4)  # transformers' legacy form: keep 4 tokens
    assert session.position == 6


def test_acceptance_rate():
    assert SpeculationStats().acceptance_rate is None
    assert SpeculationStats(drafted=8, accepted=6, rounds=2).acceptance_rate == 0.75


class _Guesser:
    def __init__(self, extra: int, with_logits: bool):
        self.extra, self.with_logits = extra, with_logits

    def get_candidates(self, input_ids):
        candidates = torch.cat([input_ids, torch.arange(self.extra).view(1, -1)], 1)
        return candidates, torch.zeros(1, self.extra, 7) if self.with_logits else None

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        pass


@pytest.mark.parametrize("with_logits", [False, True])
def test_candidates_never_go_past_max_length(with_logits):
    """transformers' prompt lookup proposes up to K tokens past max_length; a server session has no room for them."""
    generator = cap_candidates(_Guesser(extra=5, with_logits=with_logits), max_length=12)
    candidates, logits = generator.get_candidates(torch.zeros(1, 9, dtype=torch.long))
    assert candidates.shape == (1, 11)  # 9 + 2: the model's own next token after them still fits in 12
    assert logits is None or logits.shape == (1, 2, 7)
    candidates, _ = generator.get_candidates(torch.zeros(1, 4, dtype=torch.long))
    assert candidates.shape == (1, 9)  # room enough: untouched
    generator = cap_candidates(_Guesser(extra=80, with_logits=with_logits), max_length=1000)
    candidates, logits = generator.get_candidates(torch.zeros(1, 4, dtype=torch.long))
    assert candidates.shape == (1, 4 + 63)  # a check step of 63 + 1 tokens: still relayed (RELAY_MAX_TOKENS 64)
