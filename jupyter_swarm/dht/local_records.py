"""The records one peer holds for the swarm: bounded in total and per announcing peer, expired without scans.

Every operation costs O(log n) (amortised) in the number of entries held: expiry pops a heap of deadlines, the
peer that holds most is found in a count-bucket structure, and nothing ever walks the whole store.

Limits: each announcing peer may hold ``peer_entries`` entries and ``peer_bytes`` bytes here; the whole store
holds ``max_entries`` and ``max_bytes``. When the whole store is full, a newcomer's entry evicts the oldest entry
of the peer that holds the most, as long as that peer holds more than the newcomer would: so every peer keeps at
least a fair share, and many identities flooding the store cannot push out a server's few records.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from jupyter_swarm.errors import ProtocolError

MAX_ENTRIES = 100_000
MAX_BYTES = 256 * 2**20
PEER_ENTRIES = 2048  # a server announces one entry per block it serves, plus one per model
PEER_BYTES = 8 * 2**20
ENTRY_OVERHEAD = 128  # bytes of bookkeeping counted per entry, so that empty values still cost something


@dataclass
class _Entry:
    value: bytes
    issued: float
    expires: float  # monotonic deadline
    seq: int
    size: int


class _Holdings:
    """Entries per peer, and which peer holds the most, in O(1) per change."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self._with_count: dict[int, set[str]] = {}
        self._most = 0

    def change(self, peer: str, delta: int) -> None:
        old = self.count.get(peer, 0)
        new = old + delta
        if old:
            self._with_count[old].discard(peer)
            if not self._with_count[old]:
                del self._with_count[old]
        if new:
            self.count[peer] = new
            self._with_count.setdefault(new, set()).add(peer)
            self._most = max(self._most, new)
        else:
            del self.count[peer]
        while self._most and self._most not in self._with_count:
            self._most -= 1  # counts move by one at a time, so this walks down at most one step per change

    def largest(self) -> tuple[str, int] | None:
        if not self._most:
            return None
        return next(iter(self._with_count[self._most])), self._most


class LocalRecords:
    """``key -> {subkey: value}`` with expiry (monotonic clock), per-peer quotas and fair eviction.

    The sub-key is the announcing peer (its peer id), which the caller has authenticated.
    """

    def __init__(self, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 peer_entries: int = PEER_ENTRIES, peer_bytes: int = PEER_BYTES,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.peer_entries, self.peer_bytes = peer_entries, peer_bytes
        self._clock = clock
        self._data: dict[str, dict[str, _Entry]] = {}
        self._heap: list[tuple[float, int, str, str]] = []  # (deadline, seq, key, subkey); stale items skipped
        self._by_peer: dict[str, dict[str, None]] = {}  # peer -> its keys, oldest first
        self._peer_bytes: dict[str, int] = {}
        self._holdings = _Holdings()
        self._seq = 0
        self._entries = 0
        self.bytes_used = 0

    def __len__(self) -> int:
        return self._entries

    def usage(self, peer: str) -> tuple[int, int]:
        """(entries, bytes) that ``peer``'s records take here."""
        return self._holdings.count.get(peer, 0), self._peer_bytes.get(peer, 0)

    def put(self, key: str, subkey: str, value: bytes, ttl: float, *, issued: float = 0.0) -> None:
        """Hold ``value`` under (key, subkey) for ``ttl`` seconds. A record issued before the one held is refused
        (a replayed older record must not replace a newer one). Raises ProtocolError when a quota is exhausted."""
        if not (math.isfinite(ttl) and ttl > 0):
            raise ProtocolError(f"a record's ttl must be a positive finite number of seconds, got {ttl!r}")
        self.expire()
        now = self._clock()
        size = len(key) + len(subkey) + len(value) + ENTRY_OVERHEAD
        entries = self._data.get(key)
        old = entries.get(subkey) if entries else None
        if old is not None and old.issued > issued:
            raise ProtocolError("a newer record of this peer is already held under this key")
        old_size = old.size if old is not None else 0
        added = 0 if old is not None else 1
        count, held = self.usage(subkey)
        if count + added > self.peer_entries or held - old_size + size > self.peer_bytes:
            raise ProtocolError(f"peer {subkey} has used its quota here ({self.peer_entries} records, "
                                f"{self.peer_bytes} bytes); let old records expire first")
        while len(self) + added > self.max_entries or self.bytes_used - old_size + size > self.max_bytes:
            self._evict_for(subkey, count + added)
        if old is not None:
            self._drop(key, subkey)
        self._seq += 1
        entry = _Entry(value, issued, now + ttl, self._seq, size)
        self._data.setdefault(key, {})[subkey] = entry
        self._by_peer.setdefault(subkey, {})[key] = None
        self._peer_bytes[subkey] = self._peer_bytes.get(subkey, 0) + size
        self._holdings.change(subkey, +1)
        self._entries += 1
        self.bytes_used += size
        heapq.heappush(self._heap, (entry.expires, entry.seq, key, subkey))
        if len(self._heap) > 2 * len(self) + 1024:  # refreshed entries leave stale heap items behind
            self._heap = [(e.expires, e.seq, k, s) for k, es in self._data.items() for s, e in es.items()]
            heapq.heapify(self._heap)

    def get(self, key: str) -> dict[str, tuple[bytes, float]]:
        """Unexpired entries of ``key`` as {subkey: (value, seconds left)}."""
        now = self._clock()
        return {s: (e.value, e.expires - now) for s, e in self._data.get(key, {}).items() if e.expires > now}

    def expire(self) -> None:
        """Drop every entry whose deadline passed (pops only those: O(log n) each)."""
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _deadline, seq, key, subkey = heapq.heappop(self._heap)
            entry = self._data.get(key, {}).get(subkey)
            if entry is not None and entry.seq == seq:
                self._drop(key, subkey)

    def _evict_for(self, newcomer: str, newcomer_count: int) -> None:
        largest = self._holdings.largest()
        if largest is None or largest[1] <= newcomer_count:
            raise ProtocolError("this peer's record store is full; try other replicas")
        peer = largest[0]
        oldest_key = next(iter(self._by_peer[peer]))
        self._drop(oldest_key, peer)

    def _drop(self, key: str, subkey: str) -> None:
        entry = self._data[key].pop(subkey)
        if not self._data[key]:
            del self._data[key]
        del self._by_peer[subkey][key]
        if not self._by_peer[subkey]:
            del self._by_peer[subkey]
        self._peer_bytes[subkey] -= entry.size
        if not self._peer_bytes[subkey]:
            del self._peer_bytes[subkey]
        self._holdings.change(subkey, -1)
        self._entries -= 1
        self.bytes_used -= entry.size
