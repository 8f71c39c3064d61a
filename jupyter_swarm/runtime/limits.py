"""What one peer may use of a server: sessions, requests in flight, cache, bytes per second.

Each protocol's own limits (frame sizes, inbound streams per peer) live with the protocol (``wire/protocols.py``);
these are the server's, set per server (``ServerConfig.limits``, ``jupyter-swarm serve --limit NAME=VALUE``).
Peer ids cost nothing to make, so per-peer limits stop one greedy or broken peer, not a crowd: the crowd meets the
server's totals (cache budget, streams per protocol) and, for memory, idle-session eviction (runtime/sessions.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import AsyncIterator

import trio

from jupyter_swarm.errors import ConfigurationError, SwarmError
from jupyter_swarm.wire.protocols import RPC_MAX_IN_FLIGHT


class PeerLimitError(SwarmError):
    """A peer asked for more than its share of a server (sessions, cache); it may use another server or wait."""


@dataclass(frozen=True)
class ServerLimits:
    """Per-peer limits of one server (defaults suit a public swarm; an honest client stays far below them)."""

    sessions_per_peer: int = 32  # inference sessions open at once
    requests_in_flight_per_peer: int = RPC_MAX_IN_FLIGHT  # forward/backward computing or queued; more wait
    cache_share_per_peer: float = 0.5  # of the attention-cache budget
    bytes_per_second_per_peer: float = 256 * 2**20  # frames a peer sends us; a faster peer is slowed down
    burst_bytes_per_peer: float = 512 * 2**20
    evict_idle_after: float = 1.0  # seconds without a step before a session may be evicted under memory pressure
    compute_half_life: float = 10.0  # seconds a peer's compute counts against its turn (0: first come, first served)

    def __post_init__(self) -> None:
        if self.sessions_per_peer < 1 or self.requests_in_flight_per_peer < 1:
            raise ConfigurationError("sessions_per_peer and requests_in_flight_per_peer must be at least 1")
        if not 0 < self.cache_share_per_peer <= 1:
            raise ConfigurationError(f"cache_share_per_peer must be in (0, 1], got {self.cache_share_per_peer}")
        if self.bytes_per_second_per_peer <= 0 or self.burst_bytes_per_peer <= 0 or self.evict_idle_after < 0:
            raise ConfigurationError("byte rates must be positive and evict_idle_after at least 0")
        if not 0 <= self.compute_half_life < float("inf"):
            raise ConfigurationError(f"compute_half_life must be a finite number of seconds >= 0, got {self.compute_half_life}")

    def with_options(self, options: Iterator[str] | list[str]) -> "ServerLimits":
        """These limits with ``NAME=VALUE`` options applied (the CLI's ``--limit``)."""
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, float | int] = {}
        for option in options:
            name, _, value = option.partition("=")
            name = name.strip().replace("-", "_")
            if name not in known or not value:
                raise ConfigurationError(f"--limit {option!r}: expected NAME=VALUE with NAME one of {sorted(known)}")
            try:
                changes[name] = int(value) if known[name] in (int, "int") else float(value)
            except ValueError:
                raise ConfigurationError(f"--limit {option!r}: {value!r} is not a number") from None
        return replace(self, **changes)


class InFlight:
    """Requests of each peer being served at once; a peer's requests past its limit wait for their turn, so no
    peer holds more than its share of the compute queue."""

    def __init__(self, per_peer: int):
        self.per_peer = per_peer
        self._limiters: dict[str, trio.CapacityLimiter] = {}

    @asynccontextmanager
    async def hold(self, peer: str) -> AsyncIterator[None]:
        limiter = self._limiters.get(peer)
        if limiter is None:
            limiter = self._limiters[peer] = trio.CapacityLimiter(self.per_peer)
        try:
            async with limiter:
                yield
        finally:
            if not limiter.borrowed_tokens and not limiter.statistics().tasks_waiting:
                self._limiters.pop(peer, None)

    def serving(self, peer: str) -> int:
        limiter = self._limiters.get(peer)
        return 0 if limiter is None else limiter.borrowed_tokens
