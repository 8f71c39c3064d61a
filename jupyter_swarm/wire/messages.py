"""Message (de)serialisation: msgpack maps whose tensors are encoded by :mod:`jupyter_swarm.wire.tensors`.

Every message is a map with a ``type`` field. Replies are either the expected type or
``{"type": "error", "error": <message>}``, which the receiver turns into :class:`RemoteError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from jupyter_swarm.errors import ProtocolError, RemoteError


def pack(message: dict[str, Any]) -> bytes:
    """Serialise a message map (tensors must already be encoded)."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes, expected: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Parse a message, check its type, and raise RemoteError if the peer answered with an error."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several exception types for garbage
        raise ProtocolError(f"message is not valid msgpack ({e!r})") from e
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("message must be a map with a string 'type' field")
    if message["type"] == "error":
        raise RemoteError(str(message.get("error", "unknown error")),
                          invalid_request=message.get("invalid_request") is True)
    if expected is not None:
        allowed = (expected,) if isinstance(expected, str) else expected
        if message["type"] not in allowed:
            raise ProtocolError(f"expected a message of type {' or '.join(allowed)}, got {message['type']!r}")
    return message


def error_message(text: str, *, invalid_request: bool = False) -> bytes:
    """An error reply; ``invalid_request`` tells the client that retrying elsewhere will not help."""
    return pack({"type": "error", "error": text, "invalid_request": invalid_request})


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
