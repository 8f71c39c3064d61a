"""What a record value is: a payload signed by the peer that announces it, valid for named keys until a signed expiry.

A replica stores and returns these bytes; it cannot make them say anything else. Every reader checks, for each
record a replica returns under ``key`` and sub-key ``peer``:

- the Ed25519 signature, with the public key inside ``peer``'s own peer id (so the sub-key is the signer);
- that ``key`` is one of the keys the signer named (a record of one model or block cannot be moved to another);
- that it has not expired, that it was not issued in the future, and that its life is at most ``MAX_TTL``.

So a replica can neither forge nor alter a record, nor extend one's life. What it can still do is withhold
records or return an older one that has not expired yet; readers ask several replicas, keep every record any of
them returns, and prefer the latest ``issued`` time per peer (see ``dht/store.py``). A replayed record is thus
never newer than what the signer last said, and it dies at its own signed expiry, at most ``MAX_TTL`` after it
was issued.

Clocks: ``issued`` and ``expires`` are wall-clock (Unix) times, so peers' clocks must agree within
``MAX_CLOCK_SKEW`` seconds (NTP is far better than that).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from jupyter_swarm.errors import ProtocolError

DOMAIN = "jupyter-swarm/record/v1"  # signatures over records can never be mistaken for signatures over anything else
MAX_TTL = 3600.0
MAX_CLOCK_SKEW = 60.0
MAX_KEYS = 512  # keys one record may name (a server's blocks)
SIGNATURE_BYTES = 64

class ExpiredRecordError(ProtocolError):
    """The record's signed expiry has passed (routine at the edge of a record's life, not an attack)."""


_last_issued = 0.0
_issued_lock = threading.Lock()


def _next_issued(now: float) -> float:
    """Issue times strictly increase within this process, even if the wall clock steps back a little, so a record
    always supersedes the one its signer issued before it."""
    global _last_issued
    with _issued_lock:
        _last_issued = max(now, _last_issued + 1e-6)
        return _last_issued


@dataclass(frozen=True)
class SignedRecord:
    """A verified record: who signed it, for which keys, when, until when, and its payload."""

    signer: str
    keys: tuple[str, ...]
    issued: float
    expires: float
    value: bytes

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires - (time.time() if now is None else now)


def _signed_bytes(keys: Sequence[str], issued: float, expires: float, value: bytes) -> bytes:
    return msgpack.packb([DOMAIN, list(keys), float(issued), float(expires), value], use_bin_type=True)


def sign_record(identity: KeyPair, keys: Sequence[str], value: bytes, ttl: float, *, now: float | None = None) -> bytes:
    """The record bytes that announce ``value`` under each of ``keys`` for ``ttl`` seconds, signed by ``identity``."""
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL):
        raise ValueError(f"a record's ttl must be in (0, {MAX_TTL:g}] seconds, got {ttl!r}")
    if not 0 < len(keys) <= MAX_KEYS:
        raise ValueError(f"a record names 1..{MAX_KEYS} keys, got {len(keys)}")
    issued = _next_issued(time.time()) if now is None else now
    expires = issued + ttl
    signature = identity.private_key.sign(_signed_bytes(keys, issued, expires, value))
    return msgpack.packb({"keys": list(keys), "issued": issued, "expires": expires, "value": value,
                          "sig": signature}, use_bin_type=True)


def verify_record(blob: bytes, *, key: str, signer: str, now: float | None = None) -> SignedRecord:
    """Check a record a replica holds under ``key`` and sub-key ``signer``; raises ProtocolError saying what is wrong."""
    try:
        data = msgpack.unpackb(blob, raw=False)
    except Exception as e:  # msgpack raises several types for garbage
        raise ProtocolError(f"record is not valid msgpack ({e!r})") from e
    if not isinstance(data, dict):
        raise ProtocolError("a record must be a map")
    keys, issued, expires = data.get("keys"), data.get("issued"), data.get("expires")
    value, signature = data.get("value"), data.get("sig")
    if not isinstance(keys, list) or not 0 < len(keys) <= MAX_KEYS or not all(isinstance(k, str) for k in keys):
        raise ProtocolError(f"a record must name 1..{MAX_KEYS} keys")
    if not all(isinstance(t, float) and math.isfinite(t) for t in (issued, expires)):
        raise ProtocolError("a record's issued and expires times must be finite numbers")
    if not isinstance(value, bytes) or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise ProtocolError("a record needs bytes value and a 64-byte signature")
    if key not in keys:
        raise ProtocolError(f"the record was signed for other keys, not {key!r}")
    now = time.time() if now is None else now
    if not 0 < expires - issued <= MAX_TTL:
        raise ProtocolError(f"a record lives at most {MAX_TTL:g} s (this one: {expires - issued:g} s)")
    if issued > now + MAX_CLOCK_SKEW:
        raise ProtocolError(f"the record was issued {issued - now:.0f} s in the future (clocks must agree within "
                            f"{MAX_CLOCK_SKEW:g} s)")
    if expires <= now:
        raise ExpiredRecordError("the record has expired")
    public_key = _public_key_of(signer)
    try:
        valid = public_key.verify(_signed_bytes(keys, issued, expires, value), signature)
    except Exception:  # noqa: BLE001 - a malformed signature is an invalid one
        valid = False
    if not valid:
        raise ProtocolError(f"the record's signature is not {signer}'s")
    return SignedRecord(signer, tuple(keys), issued, expires, value)


def _public_key_of(peer_id: str):  # noqa: ANN202 - libp2p's PublicKey
    try:
        public_key = ID.from_base58(peer_id).extract_public_key()
    except Exception as e:  # noqa: BLE001 - base58 and multihash errors
        raise ProtocolError(f"sub-key {peer_id!r} is not a peer id") from e
    if public_key is None:
        raise ProtocolError(f"peer id {peer_id} does not embed its public key (only Ed25519 peer ids can sign records)")
    return public_key
