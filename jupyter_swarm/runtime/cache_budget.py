"""A server's attention-cache memory budget, shared by all of its inference sessions, with a share per peer."""

from __future__ import annotations

import threading

from jupyter_swarm.errors import SwarmError


class CacheFullError(SwarmError):
    """The server has no room left in its cache budget for another session of this size."""


class CachePeerShareError(CacheFullError):
    """One peer asked for more of the cache budget than its share; other peers' sessions are not evicted for it."""


class CacheBudget:
    """Bytes of attention cache a server may hold; sessions reserve their worst case when they open. No peer may
    hold more than ``peer_share`` of the total."""

    def __init__(self, total_bytes: int, peer_share: float = 1.0):
        self.total_bytes = int(total_bytes)
        self.peer_bytes = int(total_bytes * peer_share)
        self._used = 0
        self._used_by: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self._used

    def used_by(self, peer: str) -> int:
        """Bytes the sessions of ``peer`` hold."""
        return self._used_by.get(peer, 0)

    def reserve(self, size: int, peer: str = "") -> "CacheReservation":
        """Reserve ``size`` bytes for ``peer`` or raise CacheFullError saying how much is free."""
        with self._lock:
            held = self._used_by.get(peer, 0)
            if held + size > self.peer_bytes:
                raise CachePeerShareError(
                    f"the session needs {size / 2**20:.1f} MiB of cache, but your sessions on this server already hold "
                    f"{held / 2**20:.1f} MiB of the {self.peer_bytes / 2**20:.1f} MiB one peer may use; close some "
                    "sessions, use a shorter max_length or another server")
            if size > self.total_bytes - self._used:
                raise CacheFullError(
                    f"server cache is full: the session needs {size / 2**20:.1f} MiB, "
                    f"{(self.total_bytes - self._used) / 2**20:.1f} MiB of {self.total_bytes / 2**20:.1f} MiB is free; "
                    "use a shorter max_length or another server")
            self._used += size
            self._used_by[peer] = held + size
        return CacheReservation(self, size, peer)

    def _release(self, size: int, peer: str) -> None:
        with self._lock:
            self._used -= size
            left = self._used_by.get(peer, 0) - size
            if left > 0:
                self._used_by[peer] = left
            else:
                self._used_by.pop(peer, None)


class CacheReservation:
    """Bytes held by one session; released exactly once."""

    def __init__(self, budget: CacheBudget, size: int, peer: str = ""):
        self._budget = budget
        self.size = size
        self.peer = peer
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._release(self.size, self.peer)
