"""Guarded patches of py-libp2p 0.8.1's per-message path (TCP, Noise, yamux), in the spirit of yamux_tuning.py.

What a message costs there, measured (bench/bench_messages.py, bench/README.md): a 2 KiB ping-pong between two
processes took 0.31 ms per round trip and 0.18 ms of CPU on each side, against 0.05 ms and 0.04 ms over plain trio
sockets. cProfile of that loop: about 29 trio task steps per round trip on each side, mostly from trio locks (10
acquisitions: each one that finds the lock free still yields to the scheduler, a whole pass of trio's run loop) and
from reading each Noise message with two socket reads. The debug f-strings formatted with logging off, and the frame
writer's extra scheduler pass, measured nothing (about 15 f-strings per round trip at 0.3 us each), so they are left
as they are.

The patch:

- ``eager_locks``: the trio locks of a stream's write and read path (the stream's state lock, yamux's stream,
  window and write locks, the TCP stream's read and write locks) take a free lock without a scheduler pass.
  Waiters are still served in order (trio hands a released lock straight to the next waiter, so a free lock has
  none), and a cancelled task still gets ``Cancelled`` at the lock. Round trip 0.31 -> 0.26 ms.

Tried and not kept: reading each TCP connection in 64 KiB chunks (one system call per Noise message instead of two)
brought nothing on top of this (0.256 vs 0.255 ms) and, without the scheduler pass each socket read gives, let yamux
handle a frame's data and a following reset in one go, so the reset discarded the data before the stream's reader
saw it (a refused stream then failed while negotiating its protocol instead of at its first message).

Each checks the py-libp2p version and the internals it relies on, and changes nothing (logging why) when they
differ. ``JUPYTER_SWARM_LIBP2P_PATCHES`` (``all``, the default; ``none``; or a comma list of names) chooses
which are installed, for benchmarks that compare them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

import trio

logger = logging.getLogger(__name__)

SUPPORTED_VERSION = "0.8.1"
PATCHES_ENV = "JUPYTER_SWARM_LIBP2P_PATCHES"


def _libp2p_version() -> str | None:
    try:
        return metadata.version("libp2p")
    except metadata.PackageNotFoundError:
        return None


def _refuse(name: str, why: str) -> bool:
    logger.info("py-libp2p hot-path patch %s not installed: %s", name, why)
    return False


def _supported(name: str) -> bool:
    version = _libp2p_version()
    if version != SUPPORTED_VERSION:
        return _refuse(name, f"written for py-libp2p {SUPPORTED_VERSION}, found {version}")
    return True


# ---- eager locks ------------------------------------------------------------------------------------------------

class EagerLock:
    """A ``trio.Lock`` whose acquire does not yield to the scheduler when the lock is free.

    trio's own acquire always takes a scheduler pass (it is a checkpoint). Fairness is kept: a released trio lock
    is handed to its first waiter at once, so a lock with waiters is never free and a newcomer queues behind them.
    Cancellation is kept: a task whose scope is cancelled gets ``Cancelled`` here, as with trio's lock.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> Any:
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class EagerSemaphore:
    """A ``trio.Semaphore`` (any task may release it) whose acquire does not yield when a unit is free; as fair and
    as cancellable as :class:`EagerLock`."""

    __slots__ = ("_semaphore",)

    def __init__(self, value: int) -> None:
        self._semaphore = trio.Semaphore(value)

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._semaphore.acquire_nowait()
        except trio.WouldBlock:
            await self._semaphore.acquire()

    def acquire_nowait(self) -> None:
        self._semaphore.acquire_nowait()

    def release(self) -> None:
        self._semaphore.release()

    @property
    def value(self) -> int:
        return self._semaphore.value

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._semaphore.release()


def _swap_locks_after_init(cls: type, make: Callable[[Any], None]) -> None:
    init = cls.__init__

    @functools.wraps(init)
    def init_with_eager_locks(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        make(self)

    cls.__init__ = init_with_eager_locks  # type: ignore[misc]


def _eager(obj: Any, *names: str) -> None:
    """Replace the named attributes of ``obj`` that are trio locks (anything else is left as it is)."""
    for name in names:
        if type(getattr(obj, name, None)) is trio.Lock:
            setattr(obj, name, EagerLock())


def _eager_rw_lock(rw_lock: Any) -> None:
    """py-libp2p's ReadWriteLock: a trio lock for its reader count and a semaphore of one for writers (released by
    whichever reader leaves last, hence a semaphore)."""
    _eager(rw_lock, "_readers_lock")
    writer = getattr(rw_lock, "_writer_lock", None)
    if type(writer) is trio.Semaphore and writer.value == 1 and writer.max_value is None:
        rw_lock._writer_lock = EagerSemaphore(1)


def eager_locks() -> bool:
    """Install :class:`EagerLock` on the per-message path (idempotent); False, changing nothing, if py-libp2p's
    internals differ from what this was written for."""
    name = "eager_locks"
    if not _supported(name):
        return False
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.stream_muxer.rw_lock import ReadWriteLock
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    classes = (TrioTCPStream, NetStream, Yamux, YamuxStream)
    if all(getattr(cls, "_jupyter_swarm_eager_locks", False) for cls in classes):
        return True
    if not all(hasattr(ReadWriteLock, n) for n in ("write_lock", "read_lock", "acquire_write", "release_read")):
        return _refuse(name, "py-libp2p's ReadWriteLock has changed")
    # Each class's locks are swapped right after its own __init__ made them; a lock that is not (or no longer) a
    # plain trio lock is left alone.
    _swap_locks_after_init(TrioTCPStream, lambda s: _eager(s, "read_lock", "write_lock"))
    _swap_locks_after_init(NetStream, lambda s: _eager(s, "_state_lock"))
    _swap_locks_after_init(Yamux, lambda s: _eager(s, "streams_lock", "_write_lock"))

    def yamux_stream(stream: Any) -> None:
        _eager(stream, "window_lock", "close_lock")
        if isinstance(getattr(stream, "rw_lock", None), ReadWriteLock):
            _eager_rw_lock(stream.rw_lock)

    _swap_locks_after_init(YamuxStream, yamux_stream)
    for cls in classes:
        cls._jupyter_swarm_eager_locks = True  # type: ignore[attr-defined]
    return True


PATCHES: dict[str, Callable[[], bool]] = {
    "eager_locks": eager_locks,
}


def chosen_patches(setting: str | None = None) -> list[str]:
    """The patch names ``JUPYTER_SWARM_LIBP2P_PATCHES`` (or ``setting``) asks for; unknown names are logged and
    skipped."""
    text = (os.environ.get(PATCHES_ENV, "all") if setting is None else setting).strip().lower()
    if text in ("", "all"):
        return list(PATCHES)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    for unknown in [n for n in names if n not in PATCHES]:
        logger.warning("%s names an unknown patch %r (known: %s)", PATCHES_ENV, unknown, ", ".join(PATCHES))
    return [n for n in names if n in PATCHES]


def patch_hot_path(setting: str | None = None) -> dict[str, bool]:
    """Install the chosen patches (idempotent); returns each chosen patch's name and whether it is installed."""
    return {name: PATCHES[name]() for name in chosen_patches(setting)}
