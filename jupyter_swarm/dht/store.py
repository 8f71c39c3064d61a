"""Expiring sub-keyed records on top of libp2p's Kademlia DHT.

py-libp2p's DHT stores one value per key with a fixed 24 h expiry, while the swarm map needs, per block,
one record per server that vanishes within seconds of the server going silent. So this module keeps
``key -> {subkey: (value, expiry)}`` on the peers closest to the key (XOR distance, as Kademlia does), among
the peers known to hold records now: connected ones that speak this protocol, ones that answered, and the servers
whose live records were read (``dht/swarm_map.py`` asks those in turn). Not every peer the DHT's routing table ever
met: under churn the dead ones outnumber the live. A replica that fails is replaced by the next closest.

The sub-key is the announcing peer's id, and every value is signed by that peer for the keys it names, with a
signed expiry (``dht/signed_records.py``): replicas check it before storing (and only take a peer's records from
that peer, authenticated by Noise), readers check it again, so a replica can neither forge nor alter another
peer's record. Readers ask every replica of a key and keep, per peer, the latest record any of them returns, so
one replica cannot erase a record by withholding it either. Each peer has a quota at each replica
(``dht/local_records.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import trio
from libp2p.peer.id import ID

from jupyter_swarm.dht.local_records import LocalRecords
from jupyter_swarm.dht.signed_records import (
    MAX_TTL, ExpiredRecordError, SignedRecord, sign_record, verify_record)
from jupyter_swarm.errors import PeerUnavailableError, ProtocolError, RemoteError, SwarmError
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.messages import Message, decode, decode_any, error_message
from jupyter_swarm.wire.protocols import RECORDS, RECORDS_MAX_REPLY_BYTES, RECORDS_MAX_REQUEST_BYTES, RECORDS_STREAMS
from jupyter_swarm.wire.records import MAX_KEYS_PER_GET, MAX_KEYS_PER_STORE, Found, Get, Store, Stored

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

PROTOCOL = RECORDS
REPLICAS = 5
STORE_BATCH_BYTES = RECORDS_MAX_REQUEST_BYTES // 2  # values per store request, leaving room for keys and framing
WIDE_REPLICAS = 3 * REPLICAS
REQUEST_TIMEOUT = 5.0
FAILED_PEER_SECONDS = 30.0  # a replica that failed is set aside this long, doubling with each failure in a row
LOOKUP_ROUNDS = 3
ANNOUNCER_MEMORY = 600.0  # seconds a server seen in the records stays a replica candidate
MAX_ANNOUNCERS = 1024


def _distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(hashlib.sha256(a).digest(), "big") ^ int.from_bytes(hashlib.sha256(b).digest(), "big")


class RecordStore:
    """Put and get expiring sub-keyed records across the swarm (runs on the node's trio thread)."""

    def __init__(self, node: P2PNode, *, serve: bool = True):
        self.node = node
        self.serving = serve  # a peer that does not serve records holds no one else's: it is never a replica
        self.local = LocalRecords()
        self._answered: set[str] = set()
        self._failing: dict[str, float] = {}  # peer -> until when it is set aside
        self._strikes: dict[str, int] = {}  # peer -> failures in a row
        self._announcers: dict[str, float] = {}  # peers whose records we read -> when (they hold records too)
        if serve:
            node.set_handler(PROTOCOL, self._handle, RECORDS_STREAMS)

    # ---- which peers hold a key ---------------------------------------------------------------
    def candidates(self) -> set[str]:
        """Peers believed to hold records now: connected peers that speak this protocol (per identify), peers that
        answered us, and servers whose live records we read (see :meth:`learn`).

        Peers that failed us are set aside (see :meth:`_peer_failed`) and do not come back from memory: the DHT
        routing table and the peerstore remember every peer ever met, and under churn the dead ones outnumber the
        live ones, filling every key's replica set (a 1,000-kill soak ended with the client unable to find any
        of the new servers). Clients sit in routing tables too but store nothing.
        """
        connected = set(self.node.connected_peers())
        now = time.monotonic()
        announcers = {p for p, seen in self._announcers.items() if now - seen < ANNOUNCER_MEMORY}
        failing = {p for p, until in self._failing.items() if until > now}
        good = {p for p in connected if self._speaks_protocol(p)} | self._answered | announcers
        return (good - failing) or (connected - failing)

    def learn(self, peer_ids: Iterable[str]) -> None:
        """Remember peers whose records we just read (servers hold records): under churn, the peers we first
        connected to may all be gone, and the servers that replaced them are only known from their records.
        A peer that failed us lately is not taken back on a record's word (a dead server's record outlives it)."""
        now = time.monotonic()
        for peer_id in peer_ids:
            if self._failing.get(peer_id, 0.0) > now:
                continue
            self._announcers.pop(peer_id, None)
            self._announcers[peer_id] = now
        while len(self._announcers) > MAX_ANNOUNCERS:
            del self._announcers[next(iter(self._announcers))]

    def _speaks_protocol(self, peer_id: str) -> bool:
        try:
            return PROTOCOL in self.node.host.get_peerstore().get_protocols(ID.from_base58(peer_id))
        except Exception:  # noqa: BLE001 - unknown peer: no protocols known yet
            return False

    def _peer_failed(self, peer_id: str) -> None:
        """Set a replica that failed aside, longer each time in a row: under churn, dead servers (known from records
        not yet expired) must not keep crowding the live ones out of the replica sets."""
        now = time.monotonic()
        self._answered.discard(peer_id)
        self._announcers.pop(peer_id, None)
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        self._failing[peer_id] = now + min(FAILED_PEER_SECONDS * 2 ** (strikes - 1), ANNOUNCER_MEMORY)
        if len(self._failing) > 2 * MAX_ANNOUNCERS:
            for peer in [p for p, until in self._failing.items() if until <= now]:
                del self._failing[peer]
                self._strikes.pop(peer, None)

    def _anchors(self) -> list[str]:
        """The peers this one joined through (bootstrap nodes, usually). Every record is also stored there and
        every read also asks them: everyone knows them, while a newcomer's view of who is closest to a key can
        miss every replica the writers chose (a status reader that had joined through the bootstrap node found
        no models at all)."""
        reach = getattr(self.node, "reach", None)
        return [] if reach is None else [p for p in reach.initial_peers if p != self.node.peer_id]

    def forget_failures(self) -> None:
        """Give every replica set aside another chance (a one-off reader trying again, e.g. ``status``)."""
        self._failing.clear()
        self._strikes.clear()

    def replicas_for(self, key: str, *, include_self: bool, count: int = REPLICAS,
                     candidates: set[str] | None = None) -> list[str]:
        """The ``count`` peers closest to ``key`` that this peer knows of (or among ``candidates``)."""
        peers = set(self.candidates() if candidates is None else candidates)
        if include_self:
            peers.add(self.node.peer_id)
        else:
            peers.discard(self.node.peer_id)
        key_bytes = key.encode()
        return sorted(peers, key=lambda p: _distance(p.encode(), key_bytes))[:count]

    # ---- client side ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, ttl: float) -> int:
        """Store our record (subkey = our peer id) under ``key``; returns how many replicas took it."""
        return await self.put_many({key: value}, ttl)

    async def put_many(self, values: dict[str, bytes], ttl: float) -> int:
        """Store several keys at once, batching the requests per replica; returns the fewest replicas any key got.

        Keys that share a value share one signed record (a server's record under each of its blocks)."""
        values = self._sign(values, ttl)

        async def store_at(peer: str, keys: list[str]) -> bool:
            batch = {key: values[key] for key in keys}
            if peer == self.node.peer_id:
                try:
                    self._accept(batch, peer, ttl)
                except ProtocolError as e:
                    logger.debug("could not store records here: %r", e)
                    return False
                return True
            for part in _store_batches(batch):
                if await self._ask(peer, Store(part, ttl), Stored) is None:
                    return False
            return True

        stored = await self._lookup(values, REPLICAS, store_at)
        return min(stored.values(), default=0)

    async def get_many(self, keys: list[str], *, wide: bool = False) -> dict[str, dict[str, tuple[bytes, float]]]:
        """Read ``keys`` from every replica; returns {key: {subkey: (value, seconds left)}}.

        Only records whose signature, keys and expiry verify are kept; per sub-key the latest issued one wins.
        ``wide``: ask ``WIDE_REPLICAS`` peers per key instead of ``REPLICAS``: when peers come and go faster than
        records are refreshed, the writer's and the reader's closest peers differ, and a wider read finds what
        a narrow one misses. Replicas that fail are replaced by the next closest (see :meth:`_lookup`)."""
        verified: dict[str, dict[str, SignedRecord]] = {key: {} for key in keys}
        checked: dict[tuple[bytes, str], SignedRecord | None] = {}  # one record often sits under many keys

        def merge(key: str, entries: dict[str, tuple[bytes, float]]) -> None:
            for subkey, (blob, _claimed_ttl) in entries.items():  # the replica's claimed ttl is not trusted
                record = self._verified(blob, key, subkey, checked)
                if record is not None and (subkey not in verified[key] or verified[key][subkey].issued < record.issued):
                    verified[key][subkey] = record

        async def get_from(peer: str, peer_keys: list[str]) -> bool:
            if peer == self.node.peer_id:
                for key in peer_keys:
                    merge(key, self.local.get(key))
                return True
            for start in range(0, len(peer_keys), MAX_KEYS_PER_GET):
                part = peer_keys[start:start + MAX_KEYS_PER_GET]
                found = await self._ask(peer, Get(part), Found, keys=part)
                if found is None:
                    return False
                for key, entries in found.records.items():
                    merge(key, entries)
            return True

        await self._lookup(keys, WIDE_REPLICAS if wide else REPLICAS, get_from)
        now = time.time()
        return {key: {subkey: (record.value, record.seconds_left(now)) for subkey, record in entries.items()}
                for key, entries in verified.items()}

    async def _lookup(self, keys: Iterable[str], count: int,
                      visit: Callable[[str, list[str]], Awaitable[bool]]) -> dict[str, int]:
        """Call ``visit(peer, keys)`` on the ``count`` closest replicas of each key and on the peers we joined
        through (:meth:`_anchors`), in rounds: a replica that fails is set aside and the next closest takes its
        place in the next round. Returns {key: visits that succeeded}. At most ``LOOKUP_ROUNDS`` rounds, each
        costing a round trip."""
        keys = list(keys)
        succeeded = {key: 0 for key in keys}
        visited: set[tuple[str, str]] = set()
        for _ in range(LOOKUP_ROUNDS):
            by_peer: dict[str, list[str]] = {}
            candidates = self.candidates()
            anchors = [p for p in self._anchors() if p in candidates]
            for key in keys:
                closest = self.replicas_for(key, include_self=self.serving, count=count, candidates=candidates)
                for peer in [*closest, *(a for a in anchors if a not in closest)]:
                    if (peer, key) not in visited:
                        by_peer.setdefault(peer, []).append(key)
            if not by_peer:
                break

            async def visit_one(peer: str, peer_keys: list[str]) -> None:
                if await visit(peer, peer_keys):
                    for key in peer_keys:
                        succeeded[key] += 1

            async with trio.open_nursery() as nursery:
                for peer, peer_keys in by_peer.items():
                    visited.update((peer, key) for key in peer_keys)
                    nursery.start_soon(visit_one, peer, peer_keys)
        return succeeded

    # ---- signing and checking records -----------------------------------------------------------------------
    def _sign(self, values: dict[str, bytes], ttl: float) -> dict[str, bytes]:
        """{key: payload} -> {key: signed record}, one signature per distinct payload."""
        keys_of: dict[bytes, list[str]] = {}
        for key, value in values.items():
            keys_of.setdefault(value, []).append(key)
        ttl = min(ttl, MAX_TTL)
        signed: dict[str, bytes] = {}
        for value, keys in keys_of.items():
            blob = sign_record(self.node.identity, keys, value, ttl)
            signed.update((key, blob) for key in keys)
        return signed

    def _accept(self, values: dict[str, bytes], sender: str, ttl: float) -> None:
        """Hold records that ``sender`` signed itself (checked before anything is stored)."""
        checked: dict[bytes, SignedRecord] = {}
        for key, blob in values.items():
            record = checked.get(blob) or verify_record(blob, key=key, signer=sender)
            if key not in record.keys:
                raise ProtocolError(f"the record was signed for other keys, not {key!r}")
            checked[blob] = record
        for key, blob in values.items():
            record = checked[blob]
            self.local.put(key, sender, blob, min(ttl, record.seconds_left()), issued=record.issued)

    @staticmethod
    def _verified(blob: bytes, key: str, subkey: str,
                  checked: dict[tuple[bytes, str], SignedRecord | None]) -> SignedRecord | None:
        """The verified record, or None (logged) when a replica returned something its sub-key never signed."""
        if (blob, subkey) not in checked:
            try:
                checked[(blob, subkey)] = verify_record(blob, key=key, signer=subkey)
            except ExpiredRecordError:
                checked[(blob, subkey)] = None  # it expired on its way here
            except ProtocolError as e:
                logger.warning("ignoring a record under %r claimed to be from %s: %s", key, subkey, e)
                checked[(blob, subkey)] = None
        record = checked[(blob, subkey)]
        return record if record is not None and key in record.keys else None

    async def _ask(self, peer: str, request: Message, reply: type[M], **context: Any) -> M | None:
        """One request to a replica and its reply; None (and the peer set aside for a while) when it does not
        answer, or answers nonsense."""
        try:
            payload = await self.node.request(peer, PROTOCOL, request.encode(), REQUEST_TIMEOUT,
                                              max_reply_bytes=RECORDS_MAX_REPLY_BYTES)
            result = decode(payload, reply, **context)
        except (SwarmError, trio.TooSlowError) as e:
            logger.debug("replica %s failed a %s request: %r", peer, request.TYPE, e)
            self._peer_failed(peer)
            return None
        self._answered.add(peer)
        self._strikes.pop(peer, None)
        return result

    # ---- server side --------------------------------------------------------------------------------
    async def _handle(self, stream: FramedStream) -> None:
        stream.max_frame_bytes = RECORDS_MAX_REQUEST_BYTES
        try:
            request = decode_any(await stream.recv(), (Store, Get))
            if isinstance(request, Store):
                self._accept(request.values, stream.remote_peer, min(request.ttl, MAX_TTL))
                await stream.send(Stored().encode())
            else:
                assert isinstance(request, Get)
                held = ((key, self.local.get(key)) for key in request.keys)
                await stream.send(Found({key: entries for key, entries in held if entries}).encode())  # no empty keys
        except (ProtocolError, RemoteError) as e:
            await stream.send(error_message(f"bad records request: {e}", invalid_request=True))


def _store_batches(values: dict[str, bytes]) -> Iterator[dict[str, bytes]]:
    """Split one replica's values into store requests that each fit a records frame."""
    part: dict[str, bytes] = {}
    size = 0
    for key, value in values.items():
        if part and (len(part) >= MAX_KEYS_PER_STORE or size + len(value) > STORE_BATCH_BYTES):
            yield part
            part, size = {}, 0
        part[key] = value
        size += len(value)
    if part:
        yield part


__all__ = ["RecordStore", "LocalRecords", "PROTOCOL", "PeerUnavailableError"]
