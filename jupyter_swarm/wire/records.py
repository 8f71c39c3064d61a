"""Messages of the records protocol: store -> stored, get -> found (one request per stream).

These are the requests only; what a record's value holds (and how it is signed) is the record layer's business
(``dht/``): here a value is opaque bytes of bounded size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jupyter_swarm.errors import ProtocolError
from jupyter_swarm.wire.messages import Message, field, float_field, list_field

MAX_KEY_CHARS = 256
MAX_SUBKEY_CHARS = 128  # a peer id
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS_PER_STORE = 256
MAX_KEYS_PER_GET = 1024

Entries = dict[str, tuple[bytes, float]]  # {subkey: (value, seconds left)}


def _key(key: Any, what: str = "key") -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
        raise ProtocolError(f"a record {what} must be a string of 1..{MAX_KEY_CHARS} characters")
    return key


def _value(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
        raise ProtocolError(f"record values must be bytes of at most {MAX_VALUE_BYTES} bytes")
    return value


@dataclass
class Store(Message):
    """Store the sender's records (sub-key: its own peer id) under each key, for ``ttl`` seconds (finite, positive;
    the record layer caps it)."""

    TYPE = "store"
    values: dict[str, bytes]
    ttl: float

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "values": self.values, "ttl": self.ttl}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Store":
        values = field(message, "values", dict)
        if not 0 < len(values) <= MAX_KEYS_PER_STORE:
            raise ProtocolError(f"a store request holds 1..{MAX_KEYS_PER_STORE} keys, got {len(values)}")
        ttl = float_field(message, "ttl", 0.0, math.inf)  # finite: a NaN or infinite TTL would never expire
        if ttl <= 0:
            raise ProtocolError(f"'ttl' must be a positive number of seconds, got {ttl}")
        return cls({_key(k): _value(v) for k, v in values.items()}, ttl)  # the record layer caps it


@dataclass
class Stored(Message):
    """The replica took every record of the store request."""

    TYPE = "stored"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Stored":
        return cls()


@dataclass
class Get(Message):
    """Read every unexpired record under each key."""

    TYPE = "get"
    keys: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "keys": self.keys}

    @classmethod
    def from_wire(cls, message: dict[str, Any], **context: Any) -> "Get":
        keys = list_field(message, "keys", MAX_KEYS_PER_GET)
        return cls([_key(k) for k in keys])


@dataclass
class Found(Message):
    """The records a replica holds: {key: {subkey: (value, seconds left)}}."""

    TYPE = "found"
    records: dict[str, Entries]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE,
                "records": {k: {s: [v, ttl] for s, (v, ttl) in entries.items()} for k, entries in self.records.items()}}

    @classmethod
    def from_wire(cls, message: dict[str, Any], *, keys: list[str] | None = None, **context: Any) -> "Found":
        """``keys``: what was asked for; a replica that answers about other keys is answering nonsense."""
        raw = field(message, "records", dict)
        asked = None if keys is None else set(keys)
        records: dict[str, Entries] = {}
        for key, entries in raw.items():
            if asked is not None and key not in asked:
                raise ProtocolError(f"the replica answered about key {key!r}, which was not asked for")
            if not isinstance(entries, dict):
                raise ProtocolError("found records must map each key to {subkey: [value, ttl]}")
            records[_key(key)] = {_key(s, "sub-key"): _entry(v) for s, v in entries.items()}
        return cls(records)


def _entry(entry: Any) -> tuple[bytes, float]:
    if not isinstance(entry, list) or len(entry) != 2:
        raise ProtocolError("a found record must be [value, ttl]")
    value, ttl = entry
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not (math.isfinite(ttl) and ttl >= 0):
        raise ProtocolError("a found record's ttl must be a finite number of seconds, at least 0")
    return _value(value), float(ttl)
