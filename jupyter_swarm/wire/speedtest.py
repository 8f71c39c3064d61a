"""Messages of the speed-test protocol: a raw payload (any bytes) -> :class:`Received` with its size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jupyter_swarm.wire.messages import Message, int_field
from jupyter_swarm.wire.protocols import SPEEDTEST_MAX_BYTES


@dataclass
class Received(Message):
    """The acknowledgement of one speed-test payload."""

    TYPE = "received"
    bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "bytes": self.bytes}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Received":
        return cls(int_field(message, "bytes", 0, SPEEDTEST_MAX_BYTES))
