"""A cap on inbound connections that counts the ones open now, for py-libp2p's swarm.

py-libp2p 0.8's swarm takes a slot of its inbound cap (``max_connections - min_connections``, 300 here) for each
inbound connection, and its handler keeps that slot until the host stops (``await self.manager.wait_finished()``,
"intentional barrier"), not until the connection closes. So after 300 inbound connections in its lifetime a host
closes every new one before the security handshake: dialers see "failed to negotiate the secure protocol". A
bootstrap node of a swarm where servers come and go goes deaf (bench/bench_chaos.py: after about 300 servers had
joined through it, every new server failed to join). :func:`cap_live_inbound` swaps in a cap on the connections
open now. The handlers themselves still wait for the host to stop (a small object per past connection; their
sockets are closed).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

logger = logging.getLogger(__name__)


class LiveInboundCap:
    """Stands in for the swarm's inbound ``trio.CapacityLimiter``: refuses a new inbound connection only while
    ``limit`` connections are open."""

    def __init__(self, swarm: Any, limit: int):
        self.swarm = swarm
        self.total_tokens = limit

    def acquire_nowait(self) -> None:
        if len(self.swarm.get_connections()) >= self.total_tokens:
            raise trio.WouldBlock

    def release(self) -> None:
        pass  # nothing held: the count is of the connections open when the next one arrives


def cap_live_inbound(swarm: Any) -> bool:
    """Make ``swarm``'s inbound cap count open connections (see the module docstring). Returns False, changing
    nothing, when the installed py-libp2p has no such cap (a newer version may not need this)."""
    limiter = getattr(swarm, "_inbound_limiter", None)
    if not isinstance(limiter, trio.CapacityLimiter):
        logger.info("py-libp2p's inbound connection cap has changed; it is left as it is")
        return False
    swarm._inbound_limiter = LiveInboundCap(swarm, int(limiter.total_tokens))
    return True
