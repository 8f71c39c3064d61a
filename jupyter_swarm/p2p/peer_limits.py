"""Per-peer limits on what other peers may use of this host: inbound streams per protocol, and bytes per second.

py-libp2p's own resource manager (``libp2p.rcmgr``, which ``new_host`` switches on) caps the whole host: 1000
connections, 10,000 streams, and 10 new connections per second from one peer (burst 50). In 0.8.1 its per-protocol
and per-peer stream scopes are not consulted when a stream arrives, and nothing limits a peer's byte rate; so
those two are here, the byte rate on libp2p's own token bucket (``libp2p.rcmgr.token_bucket``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import trio
from libp2p.rcmgr.token_bucket import TokenBucket, TokenBucketConfig

MAX_TRACKED_PEERS = 4096  # byte-rate buckets kept; the least recently seen peer's is dropped first


@dataclass(frozen=True)
class StreamQuota:
    """How many inbound streams of one protocol may be open at once: from one peer, and from everyone."""

    per_peer: int
    total: int


class StreamCounter:
    """Open inbound streams per (protocol, peer) and per protocol, against each protocol's :class:`StreamQuota`."""

    def __init__(self) -> None:
        self._by_peer: dict[tuple[str, str], int] = {}
        self._by_protocol: dict[str, int] = {}

    def try_open(self, protocol: str, peer: str, quota: StreamQuota) -> bool:
        """Count a new stream, or refuse it (False) when it would exceed the quota."""
        key = (protocol, peer)
        if self._by_peer.get(key, 0) >= quota.per_peer or self._by_protocol.get(protocol, 0) >= quota.total:
            return False
        self._by_peer[key] = self._by_peer.get(key, 0) + 1
        self._by_protocol[protocol] = self._by_protocol.get(protocol, 0) + 1
        return True

    def closed(self, protocol: str, peer: str) -> None:
        """A counted stream ended."""
        key = (protocol, peer)
        self._by_peer[key] -= 1
        if not self._by_peer[key]:
            del self._by_peer[key]
        self._by_protocol[protocol] -= 1

    def open_streams(self, protocol: str, peer: str | None = None) -> int:
        return self._by_protocol.get(protocol, 0) if peer is None else self._by_peer.get((protocol, peer), 0)


class PeerByteRate:
    """Bytes per second each peer may send us, with a burst of ``burst_bytes``: a peer over its rate is slowed
    down (its frames are read later, so libp2p's flow control pushes back on it), never cut off."""

    def __init__(self, bytes_per_second: float, burst_bytes: float):
        self.bytes_per_second = float(bytes_per_second)
        self.burst_bytes = float(burst_bytes)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, peer: str) -> TokenBucket:
        bucket = self._buckets.pop(peer, None)
        if bucket is None:
            bucket = TokenBucket(TokenBucketConfig(refill_rate=self.bytes_per_second, capacity=self.burst_bytes,
                                                   initial_tokens=self.burst_bytes, enable_monitoring=False))
            while len(self._buckets) >= MAX_TRACKED_PEERS:
                self._buckets.popitem(last=False)
        self._buckets[peer] = bucket
        return bucket

    def delay(self, peer: str, size: int, now: float | None = None) -> float:
        """Take ``size`` bytes from the peer's allowance: 0 when it had them, else the seconds to wait before
        asking again (a frame larger than the burst counts as a full burst)."""
        size = min(float(size), self.burst_bytes)
        if self._bucket(peer).try_consume(size, now):
            return 0.0
        return max(size / self.bytes_per_second, 1e-3)

    async def take(self, peer: str, size: int) -> None:
        """Wait until the peer may send ``size`` more bytes."""
        while (wait := self.delay(peer, size)) > 0:
            await trio.sleep(min(wait, 1.0))
