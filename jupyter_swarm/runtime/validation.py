"""Checks on tensors a peer sends, so that a bad request gets a clear error and never reaches the model."""

from __future__ import annotations

import torch

from jupyter_swarm.errors import ProtocolError
from jupyter_swarm.wire.protocols import MAX_BATCH_SIZE, MAX_BATCH_TOKENS


class InvalidRequestError(ProtocolError):
    """A request's tensors do not fit the span (shape, dtype, size or values)."""


def check_hidden(hidden: torch.Tensor, *, hidden_size: int, dtype: torch.dtype, name: str = "hidden states") -> None:
    """Hidden states must be [batch, seq, hidden_size] of the span's dtype, finite and of bounded size."""
    if hidden.ndim != 3 or hidden.shape[-1] != hidden_size:
        raise InvalidRequestError(
            f"{name} must have shape [batch, seq_len, {hidden_size}] for this model, got {list(hidden.shape)}")
    if hidden.dtype != dtype:
        raise InvalidRequestError(f"{name} must be {dtype} (the server's dtype), got {hidden.dtype}")
    batch, seq, _ = hidden.shape
    if batch == 0 or seq == 0:
        raise InvalidRequestError(f"{name} are empty (shape {list(hidden.shape)})")
    if batch > MAX_BATCH_SIZE or batch * seq > MAX_BATCH_TOKENS:
        raise InvalidRequestError(
            f"{name} of shape {list(hidden.shape)} exceed the server's limits "
            f"(batch <= {MAX_BATCH_SIZE}, batch x seq_len <= {MAX_BATCH_TOKENS}); split the batch")
    if not torch.isfinite(hidden).all():
        raise InvalidRequestError(f"{name} contain NaN or infinite values")


def check_prompts(prompts: torch.Tensor | None, *, num_blocks: int, batch: int, seq: int, hidden_size: int,
                  dtype: torch.dtype) -> None:
    """Deep prompts must be [span blocks, batch, pre_seq_len <= seq_len, hidden_size]."""
    if prompts is None:
        return
    if (prompts.ndim != 4 or prompts.shape[0] != num_blocks or prompts.shape[1] not in (1, batch)
            or prompts.shape[2] > seq or prompts.shape[3] != hidden_size):
        raise InvalidRequestError(
            f"prompts must have shape [{num_blocks}, {batch}, pre_seq_len <= {seq}, {hidden_size}], "
            f"got {list(prompts.shape)}")
    if prompts.dtype != dtype:
        raise InvalidRequestError(f"prompts must be {dtype}, got {prompts.dtype}")
    if not torch.isfinite(prompts).all():
        raise InvalidRequestError("prompts contain NaN or infinite values")
