"""Tensor fields of messages, checked against what the receiving span can use before anything is allocated.

A peer's message arrives as bytes that msgpack has already parsed (bounded by the protocol's frame limit). Its
tensors stay encoded (:class:`WireTensor`) until their headers -- dtype, shape, byte counts -- have passed the
checks here, so a hostile shape is refused before a single element is decoded or expanded, and a tensor that is
only passed on (a relayed step's ``carry``) is never decoded at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from jupyter_swarm.errors import InvalidRequestError, ProtocolError
from jupyter_swarm.wire.protocols import (DEFAULT_MAX_FRAME_BYTES, FRAME_OVERHEAD_BYTES, MAX_BATCH_SIZE,
                                          MAX_BATCH_TOKENS, MAX_RELAY_SPANS, RELAY_MAX_TOKENS)
from jupyter_swarm.wire.tensors import Compression, TensorHeader, decode_tensor, encode_tensor, read_header


class WireTensor:
    """An encoded tensor as it travels: header checked, bytes not yet decoded (:meth:`decode` does that)."""

    __slots__ = ("header", "wire")

    def __init__(self, header: TensorHeader, wire: dict[str, Any]):
        self.header = header
        self.wire = wire

    @classmethod
    def encode(cls, tensor: torch.Tensor, compression: Compression = Compression.NONE) -> "WireTensor":
        """Encode a local tensor for sending."""
        if not tensor.is_floating_point():
            compression = Compression.NONE  # as encode_tensor does
        return cls(TensorHeader(tensor.dtype, tuple(tensor.shape), compression), encode_tensor(tensor, compression))

    @classmethod
    def read(cls, message: dict[str, Any], name: str, default: Any = ...) -> Any:
        """The tensor field ``name`` of a peer's message, its header validated (nothing decoded)."""
        if name not in message:
            if default is ...:
                raise ProtocolError(f"message of type {message.get('type')!r} lacks the field {name!r}")
            return default
        return cls.parse(message[name], name)

    @classmethod
    def parse(cls, obj: Any, name: str) -> "WireTensor":
        """Validate one encoded tensor from a peer (``name`` says which, in errors)."""
        try:
            return cls(read_header(obj), obj)
        except ProtocolError as e:
            raise ProtocolError(f"{name}: {e}") from None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.header.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.header.dtype

    def decode(self, name: str = "tensor", *, finite: bool = False) -> torch.Tensor:
        """The tensor itself; ``finite`` refuses NaN and infinities (in anything a model will compute with)."""
        tensor = decode_tensor(self.wire, self.header)
        if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidRequestError(f"{name} contain NaN or infinite values")
        return tensor

    def to_wire(self) -> dict[str, Any]:
        return self.wire


@dataclass(frozen=True)
class SpanLimits:
    """What a server's span accepts: the bounds of every tensor in a request, and so each protocol's frame size."""

    hidden_size: int
    dtype: torch.dtype
    start: int  # the span's blocks: requests name a part of [start, end) or default to all of it
    end: int
    max_batch: int = MAX_BATCH_SIZE
    max_tokens: int = MAX_BATCH_TOKENS  # batch x sequence length

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def blocks(self, start: int | None, end: int | None) -> tuple[int, int]:
        """The blocks a request names, its missing ends defaulting to the span's."""
        return (self.start if start is None else start), (self.end if end is None else end)

    @property
    def _hidden_bytes(self) -> int:
        return self.max_tokens * self.hidden_size * self.dtype.itemsize

    def rpc_frame_bytes(self) -> int:
        """A forward or backward request: hidden states, output gradients and deep prompts at their largest."""
        return _capped((2 + self.num_blocks) * self._hidden_bytes)

    def inference_frame_bytes(self) -> int:
        """An inference step: hidden states and deep prompts, or a relayed step with everything it carries."""
        return _capped(max((1 + self.num_blocks) * self._hidden_bytes, self.push_frame_bytes()))

    def push_frame_bytes(self) -> int:
        """A relayed step: at most RELAY_MAX_TOKENS tokens, carrying one input per server before this one."""
        return _capped((1 + MAX_RELAY_SPANS) * RELAY_MAX_TOKENS * self.hidden_size * self.dtype.itemsize)


def _capped(size: int) -> int:
    return min(size + FRAME_OVERHEAD_BYTES, DEFAULT_MAX_FRAME_BYTES)


# ---- shape rules (headers only) ---------------------------------------------------------------------------
def check_hidden(tensor: WireTensor, limits: SpanLimits, name: str = "hidden states") -> None:
    """Hidden states must be [batch, seq, hidden_size] of the span's dtype, non-empty and of bounded size."""
    shape = tensor.shape
    if len(shape) != 3 or shape[-1] != limits.hidden_size:
        raise InvalidRequestError(
            f"{name} must have shape [batch, seq_len, {limits.hidden_size}] for this model, got {list(shape)}")
    if tensor.dtype != limits.dtype:
        raise InvalidRequestError(f"{name} must be {limits.dtype} (the server's dtype), got {tensor.dtype}")
    batch, seq, _ = shape
    if batch == 0 or seq == 0:
        raise InvalidRequestError(f"{name} are empty (shape {list(shape)})")
    if batch > limits.max_batch or batch * seq > limits.max_tokens:
        raise InvalidRequestError(
            f"{name} of shape {list(shape)} exceed the server's limits "
            f"(batch <= {limits.max_batch}, batch x seq_len <= {limits.max_tokens}); split the batch")


def check_prompts(prompts: WireTensor, limits: SpanLimits, *, num_blocks: int, batch: int, seq: int) -> None:
    """Deep prompts must be [span blocks, 1 or batch, pre_seq_len <= seq_len, hidden_size] of the span's dtype."""
    shape = prompts.shape
    if (len(shape) != 4 or shape[0] != num_blocks or shape[1] not in (1, batch) or shape[2] > seq
            or shape[3] != limits.hidden_size):
        raise InvalidRequestError(
            f"prompts must have shape [{num_blocks}, {batch}, pre_seq_len <= {seq}, {limits.hidden_size}], "
            f"got {list(shape)}")
    if prompts.dtype != limits.dtype:
        raise InvalidRequestError(f"prompts must be {limits.dtype}, got {prompts.dtype}")


def check_like(tensor: WireTensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None) -> None:
    """A tensor that must have exactly ``shape`` (and ``dtype``, when given), e.g. gradients or a reply's output."""
    if tensor.shape != tuple(shape):
        raise InvalidRequestError(f"{name} shape {list(tensor.shape)} must equal the hidden states' {list(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise InvalidRequestError(f"{name} must be {dtype}, got {tensor.dtype}")
    if dtype is None and not tensor.dtype.is_floating_point:
        raise InvalidRequestError(f"{name} must be floating point, got {tensor.dtype}")
