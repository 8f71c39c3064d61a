"""Choosing servers: a chain of spans that covers a range of blocks.

A deliberately simple rule for now: from each block, take the online server that reaches furthest
(fewest hops), breaking ties by throughput. Banned peers are skipped.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from jupyter_swarm.dht.records import ServerRecord
from jupyter_swarm.dht.swarm_map import SwarmMap
from jupyter_swarm.errors import MissingBlocksError


@dataclass(frozen=True)
class SpanRoute:
    """Blocks [start, end) served by one server."""

    peer_id: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return self.end - self.start


def choose_chain(swarm: SwarmMap, start: int, end: int, *, banned: set[str] = frozenset(),
                 rng: random.Random | None = None) -> list[SpanRoute]:
    """A chain of online servers covering blocks [start, end), or MissingBlocksError naming the gaps."""
    rng = rng or random.Random()
    chain: list[SpanRoute] = []
    block = start
    online = [s for s in swarm.online() if s.peer_id not in banned]
    while block < end:
        candidates = [s for s in online if s.start <= block < s.end]
        if not candidates:
            covered = {b for s in online for b in range(s.start, s.end)}
            missing = [b for b in range(start, end) if b not in covered]
            raise MissingBlocksError(missing, len({s.peer_id for s in online}))
        best_reach = max(min(s.end, end) for s in candidates)
        best = [s for s in candidates if min(s.end, end) == best_reach]
        top = max(s.throughput for s in best)
        server: ServerRecord = rng.choice([s for s in best if s.throughput == top])
        chain.append(SpanRoute(server.peer_id, block, best_reach, tuple(server.addrs)))
        block = best_reach
    return chain


class BanList:
    """Peers that failed recently, each avoided for a back-off that doubles with every new failure."""

    def __init__(self, base_seconds: float = 15.0, max_seconds: float = 600.0):
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def ban(self, peer_id: str) -> None:
        strikes = self._strikes.get(peer_id, 0)
        self._strikes[peer_id] = strikes + 1
        self._until[peer_id] = time.monotonic() + min(self.base_seconds * 2**strikes, self.max_seconds)

    def succeeded(self, peer_id: str) -> None:
        self._strikes.pop(peer_id, None)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in self._until.items() if until > now}
