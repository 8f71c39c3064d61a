"""The client's window on a swarm: its libp2p node, the swarm map, bans, and reusable streams to servers."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import trio

from jupyter_swarm.client.routing import BanList, SpanRoute, choose_chain
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.dht.swarm_map import SwarmMap, read_swarm
from jupyter_swarm.errors import ConfigurationError, MissingBlocksError, PeerUnavailableError
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.messages import pack, unpack
from jupyter_swarm.wire.protocols import RPC

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 180.0


def join_swarm(initial_peers: Sequence[str]) -> P2PNode:
    """Start a client libp2p node (no DHT serving) and connect it to the swarm through ``initial_peers``."""
    if not initial_peers:
        raise ConfigurationError(
            "initial_peers is empty: pass the /ip4/.../p2p/... address a server printed "
            "(or run `jupyter-swarm demo` for a local swarm)")
    node = P2PNode(dht_server=False).start()
    try:
        node.call(_join, node, list(initial_peers))
    except BaseException:
        node.shutdown()
        raise
    return node


async def _join(node: P2PNode, initial_peers: list[str]) -> None:
    errors = []
    for address in initial_peers:
        try:
            await node.connect(address)
        except PeerUnavailableError as e:
            errors.append(str(e))
    if len(errors) == len(initial_peers):
        raise PeerUnavailableError("none of the initial peers answered: " + "; ".join(errors))
    with trio.move_on_after(5):
        await node.dht.refresh_routing_table()  # type: ignore[union-attr]


class SwarmClient:
    """Connects to a swarm through ``initial_peers`` and finds servers for the blocks of one model."""

    def __init__(self, model_prefix: str, num_blocks: int, initial_peers: Sequence[str], *,
                 map_max_age: float = 1.0, wait_for_coverage: float = 10.0, request_timeout: float = REQUEST_TIMEOUT,
                 ban_seconds: float = 15.0):
        self.model_prefix = model_prefix
        self.num_blocks = num_blocks
        self.map_max_age = map_max_age
        self.wait_for_coverage = wait_for_coverage
        self.request_timeout = request_timeout
        self.bans = BanList(base_seconds=ban_seconds)
        self._map: SwarmMap | None = None
        self._map_time = 0.0
        self._rpc_pool: dict[str, list[FramedStream]] = {}
        self.node = join_swarm(initial_peers)
        self.store = RecordStore(self.node, serve=False)

    # ---- the swarm map ----------------------------------------------------------------------------
    async def swarm_map(self, *, fresh: bool = False) -> SwarmMap:
        """The current swarm map (re-read at most every ``map_max_age`` seconds unless ``fresh``)."""
        if fresh or self._map is None or time.monotonic() - self._map_time > self.map_max_age:
            self._map = await read_swarm(self.store, self.model_prefix, self.num_blocks)
            self._map_time = time.monotonic()
            for record in self._map.servers.values():
                self.node.remember_addrs(record.peer_id, record.addrs)
        return self._map

    def read_map(self, *, fresh: bool = True) -> SwarmMap:
        """Synchronous :meth:`swarm_map`."""
        return self.node.call(lambda: self.swarm_map(fresh=fresh))

    async def route(self, start: int, end: int) -> list[SpanRoute]:
        """A chain of servers for blocks [start, end); waits up to ``wait_for_coverage`` s for missing blocks."""
        deadline = time.monotonic() + self.wait_for_coverage
        fresh = False
        while True:
            swarm = await self.swarm_map(fresh=fresh)
            try:
                return choose_chain(swarm, start, end, banned=self.bans.banned())
            except MissingBlocksError:
                if time.monotonic() >= deadline:
                    raise
            fresh = True
            await trio.sleep(0.25)

    # ---- requests to servers ---------------------------------------------------------------------------
    async def rpc(self, peer_id: str, message: dict[str, Any], expected: str) -> dict[str, Any]:
        """Send a forward/backward/info request to a server over a pooled stream and return its reply."""
        pool = self._rpc_pool.setdefault(peer_id, [])
        stream = pool.pop() if pool else await self.node.open_stream(peer_id, RPC)
        try:
            with trio.fail_after(self.request_timeout):
                await stream.send(pack(message))
                reply = await stream.recv()
        except trio.TooSlowError:
            await stream.reset()
            raise PeerUnavailableError(f"server {peer_id} did not answer within {self.request_timeout:g} s") from None
        except BaseException:
            await stream.reset()
            raise
        pool.append(stream)
        return unpack(reply, expected)

    def close(self) -> None:
        """Close every stream and the libp2p host."""
        self.node.shutdown()

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
