"""The attention cache of one span: transformers' own cache, sized and guarded for a server session."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedConfig

from jupyter_swarm.errors import ConfigurationError


class SessionLengthError(ConfigurationError):
    """A session tried to hold more tokens than the cache was made for."""


class SpanCache:
    """Keys and values of a span's blocks for one session (a batch of equally long sequences).

    It wraps a :class:`transformers.DynamicCache` that holds only the span's layers (numbered from 0 inside the
    span). Make one with :meth:`BlockSpan.new_cache`; :meth:`BlockSpan.forward` extends it in place.

    Attributes:
        batch_size: rows in the batch; every forward through this cache must use this batch size.
        max_length: the most tokens the session may hold; going past it raises :class:`SessionLengthError`.
        start, end: the span this cache belongs to (blocks ``[start, end)``).
    """

    def __init__(self, span_config: PreTrainedConfig, *, start: int, end: int, batch_size: int, max_length: int):
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
        if max_length < 1:
            raise ConfigurationError(f"max_length must be at least 1 token, got {max_length}")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.start = start
        self.end = end
        self.hf_cache = DynamicCache(config=span_config)
        self._length = 0
        self._broken = False

    @property
    def length(self) -> int:
        """Tokens cached so far (the position the next token will take)."""
        return self._length

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch in place (for beam search): row ``i`` becomes old row ``beam_idx[i]``."""
        self._check_usable()
        beam_idx = torch.as_tensor(beam_idx)
        if beam_idx.dim() != 1 or beam_idx.numel() != self.batch_size or beam_idx.dtype.is_floating_point:
            raise ConfigurationError(
                f"beam_idx must be a 1-D integer tensor of {self.batch_size} row indices, "
                f"got shape {tuple(beam_idx.shape)} and dtype {beam_idx.dtype}")
        if beam_idx.numel() and (int(beam_idx.min()) < 0 or int(beam_idx.max()) >= self.batch_size):
            raise ConfigurationError(f"beam_idx values must lie in [0, {self.batch_size}), got {beam_idx.tolist()}")
        self.hf_cache.reorder_cache(beam_idx.long())

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` tokens (a session stepping back, e.g. after rejected speculative tokens).

        Raises:
            ConfigurationError: ``length`` is not in ``[0, self.length]``, or a sliding-window layer has already
                dropped the tokens it would need (the cache is then unusable).
        """
        self._check_usable()
        if not 0 <= length <= self._length:
            raise ConfigurationError(f"cannot crop a cache of {self._length} tokens to {length}; "
                                     f"the length must be in 0..{self._length}")
        if length == self._length:
            return
        try:
            self.hf_cache.crop(length - self._length)
        except RuntimeError as e:  # a sliding-window layer that already forgot the tokens before its window
            self._broken = True
            raise ConfigurationError(
                f"cannot step back to position {length}: this span's sliding-window layers keep only their window, "
                f"and the session is past it; the cache is unusable now (start a new session)") from e
        self._length = length

    def check_extend(self, batch_size: int, new_tokens: int) -> None:
        """Raise unless ``new_tokens`` more tokens for ``batch_size`` rows fit into this cache."""
        self._check_usable()
        if batch_size != self.batch_size:
            raise ConfigurationError(
                f"this cache was made for a batch of {self.batch_size}, got hidden states for {batch_size} rows")
        if self._length + new_tokens > self.max_length:
            raise SessionLengthError(
                f"the session would hold {self._length + new_tokens} tokens ({self._length} cached + {new_tokens} "
                f"new), more than its limit of {self.max_length} tokens; open a session with a larger max_length")

    def advance(self, new_tokens: int) -> None:
        """Record that a forward pass appended ``new_tokens`` tokens (called by :class:`BlockSpan`)."""
        self._length += new_tokens

    def mark_broken(self) -> None:
        """Mark the cache unusable: a forward pass failed part-way, so its layers may disagree on the length."""
        self._broken = True

    def _check_usable(self) -> None:
        if self._broken:
            raise ConfigurationError(
                "this cache is unusable: an earlier forward pass through it failed part-way; start a new session")

    def __repr__(self) -> str:
        return (f"SpanCache(blocks {self.start}:{self.end}, batch_size={self.batch_size}, "
                f"length={self._length}, max_length={self.max_length})")
