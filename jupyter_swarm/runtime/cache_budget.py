"""A server's attention-cache memory budget, shared by all of its inference sessions.

Two accounts, so that an idle session cannot hold memory it does not use:
- what a session *declares* when it opens (its worst case: batch x max_length), capped per peer at ``peer_share``
  of the budget, so a session that fits its peer's share when it opens is never refused for that later;
- what its cache *holds*: it grows as steps add tokens (:meth:`CacheReservation.grow_to`), and all sessions together
  stay within the budget. When a step needs more than is free, the server evicts idle sessions (runtime/sessions.py).
"""

from __future__ import annotations

import threading

from jupyter_swarm.errors import SwarmError


class CacheBudgetError(SwarmError):
    """A session does not fit the server's cache budget."""


class CacheFullError(CacheBudgetError):
    """The budget has no room left for a session's next tokens right now (it may have later)."""


class CachePeerShareError(CacheBudgetError):
    """One peer's sessions would declare more of the cache budget than its share."""


class SessionTooLargeError(CacheBudgetError):
    """The session could need more cache than this server's whole budget."""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class CacheBudget:
    """Bytes of attention cache a server may hold, and what each peer's open sessions may declare."""

    def __init__(self, total_bytes: int, peer_share: float = 1.0):
        self.total_bytes = int(total_bytes)
        self.peer_bytes = int(total_bytes * peer_share)
        self._used = 0
        self._used_by: dict[str, int] = {}
        self._declared_by: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self._used

    def used_by_peer(self) -> dict[str, int]:
        """Bytes each peer's sessions hold now (peers holding none are left out)."""
        with self._lock:
            return dict(self._used_by)

    def declared_by(self, peer: str) -> int:
        """Worst-case bytes the open sessions of ``peer`` declared."""
        return self._declared_by.get(peer, 0)

    def open(self, declared: int, peer: str = "") -> "CacheReservation":
        """A new session of at most ``declared`` bytes for ``peer`` (holding nothing yet), or CacheBudgetError."""
        with self._lock:
            if declared > self.total_bytes:
                raise SessionTooLargeError(f"the session could need {_mib(declared)} of cache, more than this server's "
                                     f"whole budget of {_mib(self.total_bytes)}; use a shorter max_length")
            held = self._declared_by.get(peer, 0)
            if held + declared > self.peer_bytes:
                raise CachePeerShareError(
                    f"the session could need {_mib(declared)} of cache, but your open sessions on this server already "
                    f"declare {_mib(held)} of the {_mib(self.peer_bytes)} one peer may use; close some sessions, "
                    "use a shorter max_length or another server")
            self._declared_by[peer] = held + declared
        return CacheReservation(self, declared, peer)

    def _grow(self, extra: int, peer: str) -> None:
        with self._lock:
            if extra > self.total_bytes - self._used:
                raise CacheFullError(
                    f"server cache is full: the session needs {_mib(extra)} more, {_mib(self.total_bytes - self._used)} "
                    f"of {_mib(self.total_bytes)} is free; try again later or use another server")
            self._used += extra
            self._used_by[peer] = self._used_by.get(peer, 0) + extra

    def _release(self, size: int, declared: int, peer: str) -> None:
        with self._lock:
            self._used -= size
            used = self._used_by.get(peer, 0) - size
            if used > 0:
                self._used_by[peer] = used
            else:
                self._used_by.pop(peer, None)
            left = self._declared_by.get(peer, 0) - declared
            if left > 0:
                self._declared_by[peer] = left
            else:
                self._declared_by.pop(peer, None)


class CacheReservation:
    """One session's part of the budget: ``size`` bytes held now, up to the ``declared`` worst case."""

    def __init__(self, budget: CacheBudget, declared: int, peer: str = ""):
        self._budget = budget
        self.declared = declared
        self.peer = peer
        self.size = 0
        self._released = False

    def grow_to(self, size: int) -> None:
        """Hold ``size`` bytes (at most the declared worst case), or raise CacheFullError when they are not free."""
        size = min(size, self.declared)
        if size > self.size and not self._released:
            self._budget._grow(size - self.size, self.peer)
            self.size = size

    def release(self) -> None:
        """Give everything back (exactly once)."""
        if not self._released:
            self._released = True
            self._budget._release(self.size, self.declared, self.peer)
