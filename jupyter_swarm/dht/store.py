"""Expiring sub-keyed records on top of libp2p's Kademlia DHT.

py-libp2p's DHT stores one value per key with a fixed 24 h expiry, while the swarm map needs, per block,
one record per server that vanishes within seconds of the server going silent. So this module keeps
``key -> {subkey: (value, expiry)}`` on the peers closest to the key (XOR distance, as Kademlia does)
and uses the libp2p DHT's routing table to find those peers. A peer may only write the subkey equal to
its own peer id, which Noise authenticates, so no server can forge or erase another's record.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio
from libp2p.peer.id import ID

from jupyter_swarm.errors import PeerUnavailableError, ProtocolError, RemoteError, SwarmError
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.messages import error_message, field, pack, unpack

logger = logging.getLogger(__name__)

PROTOCOL = "/jupyter-swarm/records/1.0.0"
REPLICAS = 5
MAX_TTL = 3600.0
MAX_VALUE_BYTES = 64 * 1024
MAX_ENTRIES = 100_000
MAX_KEYS_PER_GET = 4096
REQUEST_TIMEOUT = 5.0
FAILED_PEER_SECONDS = 30.0


def _distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(hashlib.sha256(a).digest(), "big") ^ int.from_bytes(hashlib.sha256(b).digest(), "big")


class LocalRecords:
    """The records this peer holds for the swarm, with their expiry (monotonic clock)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, tuple[bytes, float]]] = {}
        self._count = 0

    def put(self, key: str, subkey: str, value: bytes, ttl: float) -> None:
        self.expire()
        entries = self._data.setdefault(key, {})
        if subkey not in entries:
            if self._count >= MAX_ENTRIES:
                raise ProtocolError("record store is full")
            self._count += 1
        entries[subkey] = (value, time.monotonic() + ttl)

    def get(self, key: str) -> dict[str, tuple[bytes, float]]:
        """Unexpired entries of ``key`` as {subkey: (value, seconds left)}."""
        now = time.monotonic()
        return {s: (v, exp - now) for s, (v, exp) in self._data.get(key, {}).items() if exp > now}

    def expire(self) -> None:
        now = time.monotonic()
        for key in list(self._data):
            entries = self._data[key]
            for subkey in [s for s, (_, exp) in entries.items() if exp <= now]:
                del entries[subkey]
                self._count -= 1
            if not entries:
                del self._data[key]


class RecordStore:
    """Put and get expiring sub-keyed records across the swarm (runs on the node's trio thread)."""

    def __init__(self, node: P2PNode, *, serve: bool = True):
        self.node = node
        self.local = LocalRecords()
        self._answered: set[str] = set()
        self._failing: dict[str, float] = {}
        if serve:
            node.set_handler(PROTOCOL, self._handle)

    # ---- which peers hold a key ---------------------------------------------------------------
    def _candidates(self) -> set[str]:
        """Peers believed to hold records: they speak this protocol (per identify, or they answered us).

        Clients sit in routing tables too but store nothing, and peers that just failed us are skipped,
        so neither can crowd the live servers out of a key's replica set.
        """
        connected = set(self.node.connected_peers())
        peers = set(connected)
        if self.node.dht is not None:
            peers.update(str(p) for p in self.node.dht.routing_table.get_peer_ids())
        now = time.monotonic()
        failing = {p for p, until in self._failing.items() if until > now}
        good = {p for p in peers if p in self._answered or self._speaks_protocol(p)} - failing
        return good or (connected - failing)

    def _speaks_protocol(self, peer_id: str) -> bool:
        try:
            return PROTOCOL in self.node.host.get_peerstore().get_protocols(ID.from_base58(peer_id))
        except Exception:  # noqa: BLE001 - unknown peer: no protocols known yet
            return False

    def _peer_failed(self, peer_id: str) -> None:
        self._answered.discard(peer_id)
        self._failing[peer_id] = time.monotonic() + FAILED_PEER_SECONDS

    def replicas_for(self, key: str, *, include_self: bool) -> list[str]:
        """The REPLICAS peers closest to ``key`` that this peer knows of."""
        peers = self._candidates()
        if include_self:
            peers.add(self.node.peer_id)
        else:
            peers.discard(self.node.peer_id)
        key_bytes = key.encode()
        return sorted(peers, key=lambda p: _distance(p.encode(), key_bytes))[:REPLICAS]

    # ---- client side ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, ttl: float) -> int:
        """Store our record (subkey = our peer id) under ``key``; returns how many replicas took it."""
        return await self.put_many({key: value}, ttl)

    async def put_many(self, values: dict[str, bytes], ttl: float) -> int:
        """Store several keys at once, batching the requests per replica; returns the fewest replicas any key got."""
        stored: dict[str, int] = {key: 0 for key in values}

        async def store_at(peer: str, keys: list[str]) -> None:
            batch = {key: values[key] for key in keys}
            if peer == self.node.peer_id:
                try:
                    for key, value in batch.items():
                        self.local.put(key, peer, value, ttl)
                except ProtocolError as e:
                    logger.debug("could not store records here: %r", e)
                    return
            elif await self._ask(peer, {"type": "store", "values": batch, "ttl": ttl}, "stored") is None:
                return
            for key in batch:
                stored[key] += 1

        async with trio.open_nursery() as nursery:
            for peer, keys in self._group_by_replica(values).items():
                nursery.start_soon(store_at, peer, keys)
        return min(stored.values(), default=0)

    async def get_many(self, keys: list[str]) -> dict[str, dict[str, tuple[bytes, float]]]:
        """Read ``keys`` from their replicas; returns {key: {subkey: (value, seconds left)}} (freshest wins)."""
        merged: dict[str, dict[str, tuple[bytes, float]]] = {key: {} for key in keys}

        def merge(key: str, entries: dict[str, tuple[bytes, float]]) -> None:
            for subkey, (value, ttl) in entries.items():
                if subkey not in merged[key] or merged[key][subkey][1] < ttl:
                    merged[key][subkey] = (value, ttl)

        async def get_from(peer: str, peer_keys: list[str]) -> None:
            if peer == self.node.peer_id:
                for key in peer_keys:
                    merge(key, self.local.get(key))
                return
            found = await self._ask(peer, {"type": "get", "keys": peer_keys}, "found",
                                    read=lambda reply: field(reply, "records", dict))
            for key, entries in (found or {}).items():
                if key in merged and isinstance(entries, dict):
                    merge(key, {str(s): (bytes(v[0]), float(v[1])) for s, v in entries.items()
                                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], bytes)
                                and isinstance(v[1], (int, float))})

        async with trio.open_nursery() as nursery:
            for peer, peer_keys in self._group_by_replica(keys).items():
                nursery.start_soon(get_from, peer, peer_keys)
        return merged

    def _group_by_replica(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """{replica peer: the keys it holds}, so that each replica gets one request."""
        by_peer: dict[str, list[str]] = {}
        for key in keys:
            for peer in self.replicas_for(key, include_self=True):
                by_peer.setdefault(peer, []).append(key)
        return by_peer

    async def _ask(self, peer: str, message: dict[str, Any], expected: str,
                   read: Callable[[dict[str, Any]], Any] = lambda reply: reply) -> Any:
        """One request to a replica, its reply passed through ``read``; None (and the peer set aside for a
        while) when it does not answer, or answers nonsense."""
        try:
            reply = unpack(await self.node.request(peer, PROTOCOL, pack(message), REQUEST_TIMEOUT), expected)
            result = read(reply)
        except (SwarmError, trio.TooSlowError) as e:
            logger.debug("replica %s failed a %s request: %r", peer, message["type"], e)
            self._peer_failed(peer)
            return None
        self._answered.add(peer)
        return result

    # ---- server side --------------------------------------------------------------------------------
    async def _handle(self, stream: FramedStream) -> None:
        try:
            message = unpack(await stream.recv(), ("store", "get"))
            if message["type"] == "store":
                values = field(message, "values", dict)
                ttl = min(max(field(message, "ttl", float), 0.0), MAX_TTL)
                for key, value in values.items():
                    if not isinstance(key, str) or not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
                        raise ProtocolError(f"record values must be bytes of at most {MAX_VALUE_BYTES} bytes")
                for key, value in values.items():
                    self.local.put(key, stream.remote_peer, value, ttl)
                await stream.send(pack({"type": "stored"}))
            else:
                keys = field(message, "keys", list)
                if len(keys) > MAX_KEYS_PER_GET or not all(isinstance(k, str) for k in keys):
                    raise ProtocolError(f"'keys' must be at most {MAX_KEYS_PER_GET} strings")
                records = {k: {s: [v, ttl] for s, (v, ttl) in self.local.get(k).items()} for k in keys}
                await stream.send(pack({"type": "found", "records": records}))
        except (ProtocolError, RemoteError) as e:
            await stream.send(error_message(f"bad records request: {e}"))


__all__ = ["RecordStore", "LocalRecords", "PROTOCOL", "PeerUnavailableError"]
