"""Messages of the inference protocol (open -> opened, then step -> output) and of push (server -> next server).

A relayed step (``push``) goes from the client to the first server of its chain; each server pushes a :class:`Step`
with its output to the next server's session (``session_id``), carrying on every input so far (``carry``), and the
last server answers the client with an :class:`Output` holding its output and those inputs, which the client keeps
for replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Any

import torch

from jupyter_swarm.errors import InvalidRequestError
from jupyter_swarm.wire.messages import Message, bool_field, field, int_field, list_field, str_field
from jupyter_swarm.wire.protocols import MAX_BATCH_SIZE, MAX_RELAY_SPANS, RELAY_MAX_TOKENS
from jupyter_swarm.wire.rpc import adapter_field, blocks_fields, compression_field
from jupyter_swarm.wire.tensor_fields import SpanLimits, WireTensor, check_hidden, check_like, check_prompts
from jupyter_swarm.wire.tensors import Compression

MAX_SESSION_ID_CHARS = 64
MAX_PEER_ID_CHARS = 128
MAX_PUSH_ADDRS = 8
MAX_ADDR_CHARS = 512
MAX_POSITION = 1 << 31


@dataclass
class PushTarget:
    """Where a session pushes its outputs: the next server's peer id, its session id there, its addresses."""

    peer_id: str
    session_id: str
    addrs: list[str] = dataclass_field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "session_id": self.session_id, "addrs": list(self.addrs)}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> "PushTarget":
        addrs = list_field(message, "addrs", 64, [])
        if not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in addrs):
            raise InvalidRequestError(f"push_to addrs must be multiaddr strings of at most {MAX_ADDR_CHARS} characters")
        return cls(str_field(message, "peer_id", MAX_PEER_ID_CHARS),
                   str_field(message, "session_id", MAX_SESSION_ID_CHARS), addrs[:MAX_PUSH_ADDRS])


@dataclass
class Open(Message):
    """Open an inference session on blocks ``start:end`` for ``batch_size`` rows of up to ``max_length`` tokens.

    In a relayed chain, ``session_id`` is this session's id for pushed steps, ``push_to`` the next server's session
    and ``accept_from`` the only peer (the previous server) whose pushed steps it takes.
    """

    TYPE = "open"
    max_length: int
    batch_size: int
    start: int | None = None
    end: int | None = None
    active_adapter: str | None = None
    session_id: str | None = None
    push_to: PushTarget | None = None
    accept_from: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "max_length": self.max_length, "batch_size": self.batch_size}
        for name in ("start", "end", "active_adapter", "session_id", "accept_from"):
            if getattr(self, name) is not None:
                wire[name] = getattr(self, name)
        if self.push_to is not None:
            wire["push_to"] = self.push_to.to_wire()
        return wire

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Open":
        start, end = blocks_fields(message)
        push_to = field(message, "push_to", dict, None)
        return cls(int_field(message, "max_length", 1, MAX_POSITION),
                   int_field(message, "batch_size", 1, MAX_BATCH_SIZE), start, end, adapter_field(message),
                   str_field(message, "session_id", MAX_SESSION_ID_CHARS, None),
                   None if push_to is None else PushTarget.from_wire(push_to),
                   str_field(message, "accept_from", MAX_PEER_ID_CHARS, None))


@dataclass
class Opened(Message):
    """The session is open (its cache reserved)."""

    TYPE = "opened"
    max_length: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "max_length": self.max_length}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Opened":
        return cls(int_field(message, "max_length", 1, MAX_POSITION))


@dataclass
class Step(Message):
    """New tokens' hidden states for a session, starting at ``position``.

    From the client: ``beam_idx`` reorders the cache first (beam search), ``prompts`` are deep prompts, ``push``
    asks for the step to be relayed. From the previous server (push protocol): ``session_id`` names the session
    and ``carry`` holds the inputs of every span before (never decoded here, only checked and passed on).
    """

    TYPE = "step"
    hidden: WireTensor
    position: int
    compression: Compression = Compression.NONE  # of the output
    beam_idx: WireTensor | None = None
    prompts: WireTensor | None = None
    push: bool = False
    session_id: str | None = None
    carry: list[WireTensor] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "hidden": self.hidden.to_wire(), "position": self.position,
                                "compression": self.compression.value}
        if self.beam_idx is not None:
            wire["beam_idx"] = self.beam_idx.to_wire()
        if self.prompts is not None:
            wire["prompts"] = self.prompts.to_wire()
        if self.push:
            wire["push"] = True
        if self.session_id is not None:
            wire["session_id"] = self.session_id
        if self.carry is not None:
            wire["carry"] = [c.to_wire() for c in self.carry]
        return wire

    @classmethod
    def from_wire(cls, message: dict[str, Any], *, limits: SpanLimits, **context: Any) -> "Step":
        hidden = WireTensor.read(message, "hidden")
        check_hidden(hidden, limits)
        batch, seq = hidden.shape[0], hidden.shape[1]
        beam_idx = WireTensor.read(message, "beam_idx", None)
        if beam_idx is not None and (beam_idx.shape != (batch,) or beam_idx.dtype != torch.int64):
            raise InvalidRequestError(f"beam_idx must be {batch} int64 row indices in 0..{batch - 1}")
        prompts = WireTensor.read(message, "prompts", None)
        if prompts is not None:
            check_prompts(prompts, limits, num_blocks=limits.num_blocks, batch=batch, seq=seq)
        push = bool_field(message, "push")
        carry = _read_carry(message, MAX_RELAY_SPANS - 1, hidden.shape, hidden.dtype, "carry")
        if (push or carry is not None) and batch * seq > RELAY_MAX_TOKENS:
            raise InvalidRequestError(f"a relayed step holds at most {RELAY_MAX_TOKENS} tokens x batch, "
                                      f"got {batch} x {seq}; send it to each server instead")
        return cls(hidden, int_field(message, "position", 0, MAX_POSITION), compression_field(message), beam_idx,
                   prompts, push, str_field(message, "session_id", MAX_SESSION_ID_CHARS, None), carry)


def _read_carry(message: dict[str, Any], max_items: int, shape: tuple[int, ...], dtype: torch.dtype | None,
                name: str) -> list[WireTensor] | None:
    """The ``carry`` field: inputs of the spans before, each shaped like the step's hidden states."""
    raw = message.get("carry")
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > max_items or not all(isinstance(c, dict) for c in raw):
        raise InvalidRequestError(f"carry must be a list of at most {max_items} encoded tensors")
    carry = [WireTensor.parse(c, f"carry[{i}]") for i, c in enumerate(raw)]
    for i, c in enumerate(carry):
        check_like(c, shape, f"{name}[{i}]", dtype)
    return carry


@dataclass
class Output(Message):
    """A session's output for a step, at ``position`` (the cache's new length). The answer to a relayed step also
    has ``carry``: the inputs of every span of the chain up to the one answering."""

    TYPE = "output"
    hidden: WireTensor
    position: int
    carry: list[WireTensor] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "hidden": self.hidden.to_wire(), "position": self.position}
        if self.carry is not None:
            wire["carry"] = [c.to_wire() for c in self.carry]
        return wire

    @classmethod
    def from_wire(cls, message: dict[str, Any], *, shape: tuple[int, ...], **context: Any) -> "Output":
        hidden = WireTensor.read(message, "hidden")
        check_like(hidden, shape, "the server's output")
        carry = _read_carry(message, MAX_RELAY_SPANS, shape, None, "the server's carry")
        return cls(hidden, int_field(message, "position", 0, MAX_POSITION), carry)
