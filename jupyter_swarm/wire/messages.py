"""The message codec every protocol shares: msgpack maps with a ``type`` field, and typed readers for their fields.

Each protocol's messages are classes in their own module (``wire/rpc.py``, ``wire/inference.py``,
``wire/records.py``, ``wire/speedtest.py``); each knows its ``type``, how to encode itself, and how to read itself
from a peer's map with every field checked. Replies are either the expected type or an :class:`ErrorReply`,
which :func:`decode` raises as :class:`RemoteError` (or the subclass its ``reason`` names).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import msgpack

from jupyter_swarm.errors import ProtocolError, RemoteError, ServerBusyError, SessionEvictedError

M = TypeVar("M", bound="Message")


def pack(message: dict[str, Any]) -> bytes:
    """Serialise a message map (tensors must already be encoded)."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes, expected: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Parse a message map, check its type, and raise RemoteError if the peer answered with an error."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several exception types for garbage
        raise ProtocolError(f"message is not valid msgpack ({e!r})") from e
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("message must be a map with a string 'type' field")
    if message["type"] == ErrorReply.TYPE:
        raise ErrorReply.from_wire(message).as_exception()
    if expected is not None:
        allowed = (expected,) if isinstance(expected, str) else expected
        if message["type"] not in allowed:
            raise ProtocolError(f"expected a message of type {' or '.join(allowed)}, got {message['type']!r}")
    return message


class Message:
    """A message of one protocol: ``TYPE`` on the wire, :meth:`to_wire` to send, :meth:`from_wire` to read."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """The message as a msgpack-ready map (with its ``type``)."""
        raise NotImplementedError

    @classmethod
    def from_wire(cls: type[M], message: dict[str, Any], **context: Any) -> M:
        """Read a peer's map (its type already checked), checking every field; ``context`` bounds the tensors."""
        raise NotImplementedError

    def encode(self) -> bytes:
        """The message as one frame's payload."""
        return pack(self.to_wire())


def decode(payload: bytes, kind: type[M], **context: Any) -> M:
    """Read one message of ``kind`` (an error reply raises RemoteError; anything else ProtocolError)."""
    return kind.from_wire(unpack(payload, kind.TYPE), **context)


def decode_any(payload: bytes, kinds: tuple[type[Message], ...], **context: Any) -> Message:
    """Read one message of any of ``kinds`` (a server's handler that takes several request types)."""
    message = unpack(payload, tuple(k.TYPE for k in kinds))
    kind = next(k for k in kinds if k.TYPE == message["type"])
    return kind.from_wire(message, **context)


class ErrorReply(Message):
    """A refusal or failure. ``invalid_request``: every server would refuse it (do not retry elsewhere);
    ``reason``: a machine-readable cause the client acts on (``"evicted"``: the server freed the session's cache
    under memory pressure, replay to continue; ``"busy"``: its cache has no room right now, try again shortly)."""

    TYPE = "error"
    EVICTED = "evicted"
    BUSY = "busy"

    def __init__(self, text: str, *, invalid_request: bool = False, reason: str | None = None):
        self.text, self.invalid_request, self.reason = text, invalid_request, reason

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "error": self.text, "invalid_request": self.invalid_request}
        if self.reason is not None:
            wire["reason"] = self.reason
        return wire

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "ErrorReply":
        text = message.get("error")
        reason = message.get("reason")
        return cls(str(text)[:4096] if text is not None else "unknown error",
                   invalid_request=message.get("invalid_request") is True,
                   reason=reason if isinstance(reason, str) else None)

    def as_exception(self) -> RemoteError:
        if self.reason == self.EVICTED:
            return SessionEvictedError(self.text)
        if self.reason == self.BUSY:
            return ServerBusyError(self.text)
        return RemoteError(self.text, invalid_request=self.invalid_request)


def error_message(text: str, *, invalid_request: bool = False, reason: str | None = None) -> bytes:
    """An encoded :class:`ErrorReply`."""
    return ErrorReply(text, invalid_request=invalid_request, reason=reason).encode()


# ---- typed field readers ---------------------------------------------------------------------------------
def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Read a typed field from a peer's message, raising ProtocolError naming the field on mismatch."""
    if name not in message:
        if default is ...:
            raise ProtocolError(f"message of type {message.get('type')!r} lacks the field {name!r}")
        return default
    value = message[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ProtocolError(f"field {name!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def int_field(message: dict[str, Any], name: str, low: int, high: int, default: Any = ...) -> Any:
    """An integer field within [low, high]."""
    value = field(message, name, int, default)
    if value is not default and not low <= value <= high:
        raise ProtocolError(f"field {name!r} must be in {low}..{high}, got {value}")
    return value


def float_field(message: dict[str, Any], name: str, low: float, high: float, default: Any = ...) -> Any:
    """A finite number field within [low, high] (NaN and infinities are refused)."""
    value = field(message, name, float, default)
    if value is not default and not (math.isfinite(value) and low <= value <= high):
        raise ProtocolError(f"field {name!r} must be a finite number in {low:g}..{high:g}, got {value}")
    return value


def str_field(message: dict[str, Any], name: str, max_chars: int, default: Any = ...) -> Any:
    """A non-empty string field of at most ``max_chars`` characters."""
    value = field(message, name, str, default)
    if value is not default and not 0 < len(value) <= max_chars:
        raise ProtocolError(f"field {name!r} must be 1..{max_chars} characters, got {len(value)}")
    return value


def bool_field(message: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean field (absent: ``default``)."""
    return field(message, name, bool, default)


def list_field(message: dict[str, Any], name: str, max_items: int, default: Any = ...) -> Any:
    """A list field of at most ``max_items`` items (their types are the caller's to check)."""
    value = field(message, name, list, default)
    if value is not default and len(value) > max_items:
        raise ProtocolError(f"field {name!r} may hold at most {max_items} items, got {len(value)}")
    return value
