"""Measuring a server's network bandwidth: time a payload sent to a peer of the swarm over libp2p.

Every server answers the speed test; a joining server measures itself against the peers it joined through,
so the network part of its announced throughput reflects its real link instead of a guess.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from jupyter_swarm.errors import SwarmError
from jupyter_swarm.p2p.framing import FramedStream, FrameTooLargeError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.messages import decode, error_message
from jupyter_swarm.wire.protocols import SPEEDTEST, SPEEDTEST_MAX_BYTES
from jupyter_swarm.wire.speedtest import Received

logger = logging.getLogger(__name__)

PAYLOAD_BYTES = 4 * 2**20
TIMEOUT = 20.0


async def serve_speedtest(stream: FramedStream) -> None:
    """Acknowledge each payload (at most SPEEDTEST_MAX_BYTES) with its size."""
    stream.max_frame_bytes = SPEEDTEST_MAX_BYTES
    try:
        async for payload in stream.frames():
            await stream.send(Received(len(payload)).encode())
    except FrameTooLargeError as e:
        await stream.send(error_message(str(e), invalid_request=True))


async def measure_bandwidth(node: P2PNode, peer_id: str, payload_bytes: int = PAYLOAD_BYTES) -> float:
    """Megabits per second from this node to ``peer_id`` (a small round trip's time is subtracted)."""
    stream = await node.open_stream(peer_id, SPEEDTEST)
    try:
        with trio.fail_after(TIMEOUT):
            began = trio.current_time()
            await stream.send(b"x")
            decode(await stream.recv(), Received)
            round_trip = trio.current_time() - began
            began = trio.current_time()
            await stream.send(bytes(payload_bytes))
            decode(await stream.recv(), Received)
            elapsed = max(trio.current_time() - began - round_trip, 1e-6)
    finally:
        await stream.close()
    return payload_bytes * 8 / elapsed / 1e6


async def measure_bandwidth_to_any(node: P2PNode, peer_ids: Sequence[str]) -> float | None:
    """Bandwidth to the first peer that answers the test, or None when none does."""
    for peer_id in peer_ids:
        try:
            return await measure_bandwidth(node, peer_id)
        except (SwarmError, trio.TooSlowError) as e:
            logger.debug("speed test with %s failed: %r", peer_id, e)
    return None
