"""A server's open inference sessions: how many each peer holds, and which to evict when the cache budget is full.

An idle session holds its whole cache reservation while computing nothing. When a new session does not fit, the
sessions idle for at least ``evict_idle_after`` seconds are evicted, the longest idle first, until it does: each
evicted session's client gets an error saying so (``ErrorReply.EVICTED``) and replays its inputs to continue, as
after a server failure. Nothing is evicted unless that makes enough room.

A peer holding more than its fair share of the cache (the budget over the peers holding some, the newcomer
included) yields room at once to a peer that holds less, once admitted, than it does: any of its sessions waiting
for a step may go, not just those idle for ``evict_idle_after``, the heaviest peer's first. Without this a crowd of
peers, each refilling sessions as fast as they are evicted, keeps the cache full of sessions idle for less than the
threshold, and a light client (one session of a few tokens) finds no room at all (bench/bench_flood.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from jupyter_swarm.runtime.cache_budget import CacheReservation
from jupyter_swarm.runtime.limits import PeerLimitError


@dataclass(eq=False)
class OpenSession:
    """One open session, as the table sees it."""

    peer: str
    reservation: CacheReservation
    idle_since: float | None = field(default_factory=time.monotonic)  # None while it computes a step
    wakeup: trio.CancelScope | None = None  # cancelled to evict the session while it waits for a step
    evicted: bool = False

    def waiting(self, scope: trio.CancelScope) -> None:
        """The session waits for its next step (it may be evicted from now on)."""
        self.idle_since, self.wakeup = time.monotonic(), scope

    def working(self) -> None:
        """A step arrived; the session is not idle until it waits again."""
        self.idle_since, self.wakeup = None, None


class SessionTable:
    """Open sessions per peer (at most ``per_peer``) and their eviction under memory pressure."""

    def __init__(self, per_peer: int, evict_idle_after: float):
        self.per_peer = per_peer
        self.evict_idle_after = evict_idle_after
        self._sessions: set[OpenSession] = set()
        self._count: dict[str, int] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def check_room(self, peer: str) -> None:
        """Raise PeerLimitError when ``peer`` already holds its most sessions."""
        if self._count.get(peer, 0) >= self.per_peer:
            raise PeerLimitError(f"your peer already holds {self.per_peer} inference sessions on this server, the "
                                 "most one peer may; close some (model.inference_session() as a with block) first")

    def add(self, peer: str, reservation: CacheReservation) -> OpenSession:
        """Register a session that just reserved its cache."""
        self.check_room(peer)
        session = OpenSession(peer, reservation)
        self._sessions.add(session)
        self._count[peer] = self._count.get(peer, 0) + 1
        return session

    def remove(self, session: OpenSession) -> None:
        """The session ended (its reservation is the caller's to release)."""
        if session in self._sessions:
            self._sessions.discard(session)
            self._count[session.peer] -= 1
            if not self._count[session.peer]:
                del self._count[session.peer]

    def evict_for(self, size: int, free_bytes: int, *, peer: str | None = None, budget_bytes: int = 0,
                  held: dict[str, int] | None = None) -> int:
        """Evict sessions waiting for a step until ``size`` bytes are free: those idle for ``evict_idle_after``,
        longest idle first, then (for a requesting ``peer``, a budget of ``budget_bytes`` and ``held``, the bytes
        each peer holds) those of peers over their fair share that hold more than ``peer`` will, heaviest peer
        first. Returns how many were evicted (0, and none touched, when that would not make room)."""
        now = time.monotonic()
        held = held or {}
        yields_to: set[str] = set()
        if peer is not None and budget_bytes > 0:
            fair = budget_bytes / len(held.keys() | {peer})
            requester = held.get(peer, 0) + size
            yields_to = {p for p, n in held.items() if p != peer and n > fair and n > requester}

        def long_idle(s: OpenSession) -> bool:
            return now - s.idle_since >= self.evict_idle_after  # type: ignore[operator]

        waiting = [s for s in self._sessions if s.idle_since is not None and not s.evicted
                   and (long_idle(s) or s.peer in yields_to)]
        waiting.sort(key=lambda s: (0, 0, s.idle_since) if long_idle(s) else (1, -held.get(s.peer, 0), s.idle_since))
        victims, freed = [], free_bytes
        for session in waiting:
            if freed >= size:
                break
            victims.append(session)
            freed += session.reservation.size
        if freed < size:
            return 0
        for session in victims:
            session.evicted = True
            session.reservation.release()  # its room is the new session's now; its cache goes with its task
            if session.wakeup is not None:
                session.wakeup.cancel()
            self.remove(session)
        self.evictions += len(victims)
        return len(victims)
