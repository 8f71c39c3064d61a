"""A server's attention-cache memory budget, shared by all of its inference sessions."""

from __future__ import annotations

import threading

from jupyter_swarm.errors import SwarmError


class CacheFullError(SwarmError):
    """The server has no room left in its cache budget for another session of this size."""


class CacheBudget:
    """Bytes of attention cache a server may hold; sessions reserve their worst case when they open."""

    def __init__(self, total_bytes: int):
        self.total_bytes = int(total_bytes)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self._used

    def reserve(self, size: int) -> "CacheReservation":
        """Reserve ``size`` bytes or raise CacheFullError saying how much is free."""
        with self._lock:
            if size > self.total_bytes - self._used:
                raise CacheFullError(
                    f"server cache is full: the session needs {size / 2**20:.1f} MiB, "
                    f"{(self.total_bytes - self._used) / 2**20:.1f} MiB of {self.total_bytes / 2**20:.1f} MiB is free; "
                    "use a shorter max_length or another server")
            self._used += size
        return CacheReservation(self, size)

    def _release(self, size: int) -> None:
        with self._lock:
            self._used -= size


class CacheReservation:
    """Bytes held by one session; released exactly once."""

    def __init__(self, budget: CacheBudget, size: int):
        self._budget = budget
        self.size = size
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._release(self.size)
