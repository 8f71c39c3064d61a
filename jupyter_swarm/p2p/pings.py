"""Round-trip times to other peers: measured with libp2p's own ping protocol, smoothed and expiring.

Servers ping the servers that hold the blocks right after their span and publish the results in their records
(``next_pings``); clients ping the servers they may route through. Both keep an exponential moving average
per peer (alpha 0.2, as Petals) that is forgotten after ``expiration`` seconds without a new measurement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

PING_PROTOCOL = TProtocol("/ipfs/ping/1.0.0")  # every py-libp2p host answers it
PING_TIMEOUT = 2.0
EMA_ALPHA = 0.2
EXPIRATION = 300.0
RETRY_FAILED_AFTER = 5.0  # a peer that did not answer is pinged again this soon (a relayed dial can take seconds)


class PingAggregator:
    """Smoothed round-trip times (seconds) per peer, forgotten after ``expiration`` seconds."""

    def __init__(self, alpha: float = EMA_ALPHA, expiration: float = EXPIRATION):
        self.alpha = alpha
        self.expiration = expiration
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (ema, monotonic time of last sample)
        self._failed: set[str] = set()  # peers whose last ping got no answer

    def add(self, peer_id: str, rtt: float) -> None:
        now = time.monotonic()
        old = self._rtt.get(peer_id)
        if old is None or now - old[1] > self.expiration:
            value = rtt
        else:
            value = self.alpha * rtt + (1 - self.alpha) * old[0]
        self._rtt[peer_id] = (value, now)
        self._failed.discard(peer_id)

    def failed(self, peer_id: str) -> None:
        """A ping that got no answer counts as a very slow one (unreachable peers are not preferred), and the peer is
        pinged again after RETRY_FAILED_AFTER rather than the usual refresh period."""
        self.add(peer_id, PING_TIMEOUT * 2)
        self._failed.add(peer_id)

    def forget(self, peer_id: str) -> None:
        """Drop what was measured: the path changed (a hole punch made a relayed peer direct), measure it anew."""
        self._rtt.pop(peer_id, None)
        self._failed.discard(peer_id)

    def stale(self, peer_id: str, refresh: float) -> bool:
        """Whether ``peer_id`` is due for a ping: never measured, measured over ``refresh`` s ago, or its last ping
        failed over RETRY_FAILED_AFTER s ago."""
        age = self.age(peer_id)
        return age > refresh or (peer_id in self._failed and age > RETRY_FAILED_AFTER)

    def get(self, peer_id: str) -> float | None:
        entry = self._rtt.get(peer_id)
        if entry is None or time.monotonic() - entry[1] > self.expiration:
            return None
        return entry[0]

    def age(self, peer_id: str) -> float:
        entry = self._rtt.get(peer_id)
        return float("inf") if entry is None else time.monotonic() - entry[1]

    def to_dict(self) -> dict[str, float]:
        now = time.monotonic()
        for peer in [p for p, (_, t) in self._rtt.items() if now - t > self.expiration]:
            del self._rtt[peer]
            self._failed.discard(peer)
        return {p: v for p, (v, _) in self._rtt.items()}


async def ping_peer(node: object, peer_id: str, timeout: float = PING_TIMEOUT) -> float | None:
    """One round trip of libp2p ping to ``peer_id`` in seconds (connecting and stream opening excluded, but within
    ``timeout``), or None on failure. A peer reached through a relay is pinged through it: its RTT is measured."""
    host = node.host  # type: ignore[attr-defined]
    payload = os.urandom(32)
    stream = None
    try:
        with trio.fail_after(timeout):
            await node.dial(peer_id)  # type: ignore[attr-defined]
            stream = await host.new_stream(ID.from_base58(peer_id), [PING_PROTOCOL])
            began = time.perf_counter()
            await stream.write(payload)
            echoed = b""
            while len(echoed) < len(payload):
                chunk = await stream.read(len(payload) - len(echoed))
                if not chunk:
                    return None
                echoed += chunk
            rtt = time.perf_counter() - began
        return rtt if echoed == payload else None
    except Exception:  # noqa: BLE001 - an unreachable peer is simply not measured
        return None
    finally:
        if stream is not None:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:  # noqa: BLE001
                    pass


async def ping_many(node: object, peers: Iterable[str], aggregator: PingAggregator,
                    timeout: float = PING_TIMEOUT) -> None:
    """Ping ``peers`` concurrently and feed the results to ``aggregator``."""

    async def one(peer: str) -> None:
        rtt = await ping_peer(node, peer, timeout)
        if rtt is None:
            aggregator.failed(peer)
        else:
            aggregator.add(peer, rtt)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(one, peer)
