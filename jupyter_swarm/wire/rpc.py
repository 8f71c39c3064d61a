"""Messages of the RPC protocol: batched forward and backward through a span, and a server's info."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jupyter_swarm.errors import InvalidRequestError
from jupyter_swarm.wire.messages import Message, field, int_field, str_field
from jupyter_swarm.wire.tensor_fields import SpanLimits, WireTensor, check_hidden, check_like, check_prompts
from jupyter_swarm.wire.tensors import Compression

MAX_BLOCK_INDEX = 1 << 20
MAX_ADAPTER_CHARS = 256


def compression_field(message: dict[str, Any]) -> Compression:
    """The compression the sender wants its reply in (``compression``, default none)."""
    name = field(message, "compression", str, "none")
    try:
        return Compression(name)
    except ValueError:
        raise InvalidRequestError(f"unknown compression {name!r}; use one of {[c.value for c in Compression]}") from None


def blocks_fields(message: dict[str, Any]) -> tuple[int | None, int | None]:
    """The ``start``/``end`` blocks a request names (None: that end of the server's span)."""
    start = int_field(message, "start", 0, MAX_BLOCK_INDEX, None)
    end = int_field(message, "end", 1, MAX_BLOCK_INDEX, None)
    if start is not None and end is not None and start >= end:
        raise InvalidRequestError(f"blocks {start}:{end} are empty; start must be below end")
    return start, end


def adapter_field(message: dict[str, Any]) -> str | None:
    """The LoRA adapter a request runs with (None: the base model)."""
    return str_field(message, "active_adapter", MAX_ADAPTER_CHARS, None)


@dataclass
class Forward(Message):
    """Hidden states [batch, seq, hidden] through blocks ``start:end`` (default: the server's span)."""

    TYPE = "forward"
    hidden: WireTensor
    start: int | None = None
    end: int | None = None
    compression: Compression = Compression.NONE
    active_adapter: str | None = None
    prompts: WireTensor | None = None  # deep prompts [span blocks, batch or 1, pre_seq, hidden]

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "hidden": self.hidden.to_wire(),
                                "compression": self.compression.value}
        if self.start is not None:
            wire["start"], wire["end"] = self.start, self.end
        if self.active_adapter is not None:
            wire["active_adapter"] = self.active_adapter
        if self.prompts is not None:
            wire["prompts"] = self.prompts.to_wire()
        return wire

    @classmethod
    def from_wire(cls, message: dict[str, Any], *, limits: SpanLimits, **context: Any) -> "Forward":
        hidden = WireTensor.read(message, "hidden")
        check_hidden(hidden, limits)
        start, end = blocks_fields(message)
        prompts = WireTensor.read(message, "prompts", None)
        if prompts is not None:
            first, last = limits.blocks(start, end)
            check_prompts(prompts, limits, num_blocks=last - first, batch=hidden.shape[0], seq=hidden.shape[1])
        request = cls(hidden, start, end, compression_field(message), adapter_field(message), prompts)
        request._read_extra(message, limits)
        return request

    def _read_extra(self, message: dict[str, Any], limits: SpanLimits) -> None:
        """Fields a subclass adds."""


@dataclass
class Backward(Forward):
    """Gradients through blocks ``start:end``: the forward's input, the output's gradient (and deep prompts)."""

    TYPE = "backward"
    grad_output: WireTensor | None = None  # required on the wire; a default only for dataclass ordering

    def to_wire(self) -> dict[str, Any]:
        assert self.grad_output is not None, "a backward request needs grad_output"
        return {**super().to_wire(), "grad_output": self.grad_output.to_wire()}

    def _read_extra(self, message: dict[str, Any], limits: SpanLimits) -> None:
        self.grad_output = WireTensor.read(message, "grad_output")
        check_like(self.grad_output, self.hidden.shape, "grad_output", limits.dtype)


@dataclass
class ForwardResult(Message):
    """The span's output for a :class:`Forward` (same shape as its input)."""

    TYPE = "forward_result"
    hidden: WireTensor

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "hidden": self.hidden.to_wire()}

    @classmethod
    def from_wire(cls, message: dict[str, Any], *, shape: tuple[int, ...], **context: Any) -> "ForwardResult":
        hidden = WireTensor.read(message, "hidden")
        check_like(hidden, shape, "the server's output")
        return cls(hidden)


@dataclass
class BackwardResult(Message):
    """Gradients for a :class:`Backward`: w.r.t. its input, and its deep prompts when it sent some."""

    TYPE = "backward_result"
    grad_hidden: WireTensor
    grad_prompts: WireTensor | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "grad_hidden": self.grad_hidden.to_wire()}
        if self.grad_prompts is not None:
            wire["grad_prompts"] = self.grad_prompts.to_wire()
        return wire

    @classmethod
    def from_wire(cls, message: dict[str, Any], *, shape: tuple[int, ...],
                  prompts_shape: tuple[int, ...] | None = None, **context: Any) -> "BackwardResult":
        grad_hidden = WireTensor.read(message, "grad_hidden")
        check_like(grad_hidden, shape, "the server's grad_hidden")
        grad_prompts = WireTensor.read(message, "grad_prompts", None)
        if grad_prompts is not None:
            if prompts_shape is None:
                raise InvalidRequestError("the server sent prompt gradients for a request without prompts")
            check_like(grad_prompts, prompts_shape, "the server's grad_prompts")
        return cls(grad_hidden, grad_prompts)


@dataclass
class Info(Message):
    """Ask a server which blocks it serves and how much cache it has left."""

    TYPE = "info"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Info":
        return cls()


@dataclass
class InfoResult(Message):
    """A server's span, dtype, quantization and free cache (in tokens at batch 1)."""

    TYPE = "info_result"
    start: int
    end: int
    dtype: str
    quant_type: str
    cache_tokens_left: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "start": self.start, "end": self.end, "dtype": self.dtype,
                "quant_type": self.quant_type, "cache_tokens_left": self.cache_tokens_left}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "InfoResult":
        return cls(int_field(message, "start", 0, MAX_BLOCK_INDEX), int_field(message, "end", 0, MAX_BLOCK_INDEX),
                   str_field(message, "dtype", 32), str_field(message, "quant_type", 32),
                   int_field(message, "cache_tokens_left", 0, 1 << 62))
