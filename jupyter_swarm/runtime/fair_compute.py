"""A server's compute slot, shared fairly between peers.

Model calls take turns (one at a time, so sessions never share a cache). First come, first served lets a crowd of
peers that each stay within their limits push an honest client's one-token steps behind their prefills: with 50
such peers, its time per token was 12-14x unloaded (bench/bench_flood.py). Here, when the slot frees, the smallest
waiting call goes next (fewest tokens: a decode step before a prefill, as Petals puts inference steps first), and
among equally small ones the peer that used the least compute recently (its compute seconds, decayed with a
half-life), then the first come. So a decode step waits for at most the one call already running, however many
prefills queue, and peers sending steps of one size share the slot fairly. The price: a large call (a long
prefill, a training batch) waits while smaller ones keep arriving; its client's step timeout bounds that.
With ``half_life=0`` the slot is first come, first served (``--limit compute_half_life=0``).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

MAX_TRACKED_PEERS = 4096  # usage kept for this many peers; the least used are forgotten first


@dataclass(eq=False)
class _Waiter:
    peer: str
    tokens: int
    order: int
    granted: trio.Event = field(default_factory=trio.Event)


class FairCompute:
    """One compute slot; waiting calls are served smallest first, then least recent compute, then first come
    (``half_life`` 0: first come, first served)."""

    def __init__(self, half_life: float = 10.0):
        self.half_life = half_life
        self._busy = False
        self._waiters: list[_Waiter] = []
        self._usage: dict[str, tuple[float, float]] = {}  # peer -> (compute seconds, when last charged)
        self._order = 0

    def usage(self, peer: str, now: float | None = None) -> float:
        """The peer's compute seconds, each halved every ``half_life`` seconds since it was spent."""
        seconds, at = self._usage.get(peer, (0.0, 0.0))
        now = time.monotonic() if now is None else now
        return seconds * math.exp2(-(now - at) / self.half_life) if seconds else 0.0

    def try_acquire(self) -> bool:
        """Take the slot now if it is free and nobody waits (then :meth:`release` it)."""
        if self._busy or self._waiters:
            return False
        self._busy = True
        return True

    async def acquire(self, peer: str, tokens: int = 1) -> None:
        """Wait for the slot for a call of ``tokens`` tokens (then :meth:`release` it)."""
        if self.try_acquire():
            return
        self._order += 1
        waiter = _Waiter(peer, tokens, self._order)
        self._waiters.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self.release()  # it was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Hand the slot to the next waiting call (smallest, then least recent compute, then first), or free it."""
        if not self._waiters:
            self._busy = False
            return
        if self.half_life <= 0:
            chosen = self._waiters[0]
        else:
            now = time.monotonic()
            usage = {w.peer: self.usage(w.peer, now) for w in self._waiters}
            chosen = min(self._waiters, key=lambda w: (w.tokens, usage[w.peer], w.order))
        self._waiters.remove(chosen)
        chosen.granted.set()  # the slot stays busy: it is the chosen waiter's now

    def charge(self, peer: str, seconds: float) -> None:
        """Count ``seconds`` of compute against ``peer``."""
        if self.half_life <= 0:
            return
        now = time.monotonic()
        self._usage[peer] = (self.usage(peer, now) + seconds, now)
        if len(self._usage) > MAX_TRACKED_PEERS:
            del self._usage[min(self._usage, key=lambda p: self.usage(p, now))]

    @asynccontextmanager
    async def turn(self, peer: str, tokens: int = 1) -> AsyncIterator[None]:
        """Hold the slot for one call of ``peer`` over ``tokens`` tokens, charged to it."""
        await self.acquire(peer, tokens)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.charge(peer, time.perf_counter() - started)
            self.release()
