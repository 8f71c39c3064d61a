"""The client's window on a swarm: its libp2p node, the swarm map, bans, and reusable streams to servers."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

import trio
from libp2p.crypto.keys import KeyPair

from jupyter_swarm.client.routing import (BanList, SpanRoute, choose_chain, choose_forward_chain, explain_missing,
                                          servers_to_ping, unsuitable_servers)
from jupyter_swarm.client.verification import DEFAULT_PROBABILITY as DEFAULT_VERIFY, OutputVerifier
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.dht.swarm_map import SwarmMap, read_swarm
from jupyter_swarm.errors import ConfigurationError, MissingBlocksError, PeerUnavailableError
from jupyter_swarm.models.quantization import parse_quant_type
from jupyter_swarm.p2p.addresses import INITIAL_PEERS_ENV, default_listen, resolve_initial_peers
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.reachability import NetworkOptions
from jupyter_swarm.p2p.pings import PingAggregator, ping_many
from jupyter_swarm.p2p.swarm_key import SwarmKey, resolve_swarm_key
from jupyter_swarm.wire.messages import Message, decode
from jupyter_swarm.wire.protocols import RPC, RPC_MAX_IN_FLIGHT

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

REQUEST_TIMEOUT = 180.0
MAX_PINGED = 32  # servers pinged per refresh (the rest count as DEFAULT_RTT until pinged)
PING_REFRESH = 60.0  # seconds before a server's round-trip time is measured again
FIRST_PING_TIMEOUT = 1.0


def join_swarm(initial_peers: Sequence[str], *, swarm_key: str | SwarmKey | None = None,
               identity: KeyPair | None = None) -> P2PNode:
    """Start a client libp2p node (no DHT serving) and connect it to the swarm through ``initial_peers`` (default:
    ``$JUPYTER_SWARM_INITIAL_PEERS``). It listens on every interface unless the swarm is on loopback, so that it
    can hole-punch to servers behind NAT; it never takes relay slots or relays for others.

    ``swarm_key``: the key file of a private swarm (default: the file named by ``$JUPYTER_SWARM_KEY``, if set).
    """
    initial_peers = resolve_initial_peers(initial_peers)
    if not initial_peers:
        raise ConfigurationError(
            "initial_peers is empty: pass the /ip4/.../p2p/... address a server printed, or set "
            f"{INITIAL_PEERS_ENV} (or run `jupyter-swarm demo` for a local swarm)")
    network = NetworkOptions(use_relays=False, relay_service=False, autonat=False)
    node = P2PNode(dht_server=False, swarm_key=resolve_swarm_key(swarm_key), identity=identity,
                   listen=default_listen(initial_peers), network=network).start()
    try:
        node.call(node.join, list(initial_peers))
    except BaseException:
        node.shutdown()
        raise
    return node


class SwarmClient:
    """Connects to a swarm through ``initial_peers`` and finds servers for the blocks of one model."""

    def __init__(self, model_prefix: str, num_blocks: int, initial_peers: Sequence[str], *,
                 map_max_age: float = 1.0, wait_for_coverage: float = 10.0, request_timeout: float = REQUEST_TIMEOUT,
                 ban_seconds: float = 15.0, allowed_servers: Collection[str] | None = None,
                 blocked_servers: Collection[str] = (), allowed_quant_types: Collection[str] | None = None,
                 swarm_key: str | SwarmKey | None = None, identity: KeyPair | None = None,
                 verify: float = DEFAULT_VERIFY):
        self.model_prefix = model_prefix
        if isinstance(allowed_servers, str) or isinstance(blocked_servers, str):
            raise ConfigurationError("allowed_servers and blocked_servers are lists of peer ids, not one string")
        self.allowed_servers = None if allowed_servers is None else frozenset(allowed_servers)
        self.blocked_servers = frozenset(blocked_servers)
        self.allowed_quant_types = _quant_type_names(allowed_quant_types)  # None: servers of every quant type
        self.active_adapter: str | None = None  # LoRA adapter requests use; routes avoid servers without it
        self.pings = PingAggregator()
        self.push = True  # relay small inference steps from server to server (see client/inference.py)
        self._pinging = False
        self._rng = random.Random()
        self.num_blocks = num_blocks
        self.map_max_age = map_max_age
        self._map_refreshing = False
        self.wait_for_coverage = wait_for_coverage
        self.request_timeout = request_timeout
        self.bans = BanList(base_seconds=ban_seconds)
        self._map: SwarmMap | None = None
        self._map_time = 0.0
        self._rpc_pool: dict[str, list[FramedStream]] = {}
        self._rpc_slots: dict[str, trio.CapacityLimiter] = {}  # RPC_MAX_IN_FLIGHT requests per server at once
        self.verifier = OutputVerifier(self, verify)  # checks a share of inference steps on second servers
        self.node = join_swarm(initial_peers, swarm_key=swarm_key, identity=identity)
        # after a hole punch the relayed round trip no longer holds: measure the direct one before routing again
        self.node.call_sync(self.node.watch_links, lambda peer: self.pings.forget(peer))
        self.store = RecordStore(self.node, serve=False)

    # ---- the swarm map ----------------------------------------------------------------------------
    async def swarm_map(self, *, fresh: bool = False, wide: bool = False) -> SwarmMap:
        """The swarm map. ``fresh`` reads it now (``wide``: from more replicas per block); otherwise the last map
        is returned at once and, when older than ``map_max_age`` seconds, re-read in the background (reading costs
        10-20 ms, too much per generate())."""
        if fresh or self._map is None:
            await self._read_map(wide=wide)
        elif time.monotonic() - self._map_time > self.map_max_age and not self._map_refreshing:
            self._map_refreshing = True
            self.node.spawn(self._refresh_map_in_background)
        assert self._map is not None
        return self._map

    async def _refresh_map_in_background(self) -> None:
        try:
            await self._read_map()
        except Exception:  # noqa: BLE001 - a failed refresh must not take the client's host down
            logger.warning("could not refresh the swarm map; using the previous one", exc_info=True)

    async def _read_map(self, *, wide: bool = False) -> None:
        try:
            swarm = await read_swarm(self.store, self.model_prefix, self.num_blocks, wide=wide)
            self._map, self._map_time = swarm, time.monotonic()
        finally:
            self._map_refreshing = False

    def read_map(self, *, fresh: bool = True) -> SwarmMap:
        """Synchronous :meth:`swarm_map`."""
        return self.node.call(lambda: self.swarm_map(fresh=fresh))

    async def route(self, start: int, end: int, *, purpose: str = "inference",
                    cache_tokens: int | None = None) -> list[SpanRoute]:
        """A chain of servers for blocks [start, end); waits up to ``wait_for_coverage`` s for missing blocks.

        ``purpose="inference"``: the fastest chain per token (see :func:`choose_chain`); ``"forward"``: a chain
        spread over servers by throughput (see :func:`choose_forward_chain`).
        """
        deadline = time.monotonic() + self.wait_for_coverage
        fresh = False
        while True:
            swarm = await self.swarm_map(fresh=fresh, wide=fresh)
            lists = self.route_lists(swarm)
            try:
                if purpose == "forward":
                    return choose_forward_chain(swarm, start, end, rng=self._rng, **lists)
                await self._refresh_pings(swarm, start, end, lists)
                return choose_chain(swarm, start, end, rng=self._rng, pings=self.pings.to_dict(),
                                    cache_tokens=cache_tokens, push=self.push, **lists)
            except MissingBlocksError as e:
                if time.monotonic() >= deadline:
                    raise explain_missing(e, swarm, self.allowed_quant_types) from None
            fresh = True
            await trio.sleep(0.25)

    def route_lists(self, swarm: SwarmMap) -> dict[str, Any]:
        """The banned, allowed and blocked servers routes avoid or keep to (keyword arguments of the routers)."""
        return dict(banned=self.bans.banned(), allowed=self.allowed_servers,
                    blocked=self.blocked_servers | self.unsuitable_servers(swarm))

    def unsuitable_servers(self, swarm: SwarmMap) -> set[str]:
        """Servers whose blocks this client's requests cannot use (see :func:`unsuitable_servers`)."""
        return unsuitable_servers(swarm, active_adapter=self.active_adapter,
                                  allowed_quant_types=self.allowed_quant_types)

    async def _refresh_pings(self, swarm: SwarmMap, start: int, end: int, lists: dict) -> None:
        """Measure round trips to servers not pinged lately: at once the first time, then in the background."""
        if self._pinging or not any(self.pings.stale(s.peer_id, PING_REFRESH) for s in swarm.servers.values()
                                    if s.start < end and s.end > start):
            return
        stale = servers_to_ping(swarm, start, end, pings=self.pings.to_dict(), limit=MAX_PINGED, rng=self._rng,
                                stale=lambda peer: self.pings.stale(peer, PING_REFRESH), push=self.push, **lists)
        if not stale:
            return
        first = not self.pings.to_dict()
        self._pinging = True

        async def ping_stale() -> None:
            try:
                await ping_many(self.node, stale, self.pings, timeout=FIRST_PING_TIMEOUT if first else 5.0)
            finally:
                self._pinging = False

        if first:
            await ping_stale()
        else:
            self.node.spawn(ping_stale)

    # ---- requests to servers ---------------------------------------------------------------------------
    async def rpc(self, peer_id: str, request: Message, reply_kind: type[M], **context: object) -> M:
        """Send a forward/backward/info request to a server over a pooled stream and return its reply (read with
        ``context``: the shapes the reply's tensors must have). At most RPC_MAX_IN_FLIGHT requests go to one server
        at once (the rest wait here), within what servers take from one peer (wire/protocols.py)."""
        slots = self._rpc_slots.setdefault(peer_id, trio.CapacityLimiter(RPC_MAX_IN_FLIGHT))
        async with slots:
            pool = self._rpc_pool.setdefault(peer_id, [])
            stream = pool.pop() if pool else await self.node.open_stream(peer_id, RPC)
            try:
                with trio.fail_after(self.request_timeout):
                    await stream.send(request.encode())
                    reply = await stream.recv()
            except trio.TooSlowError:
                await stream.reset()
                raise PeerUnavailableError(f"server {peer_id} did not answer within {self.request_timeout:g} s") from None
            except BaseException:
                await stream.reset()
                raise
            pool.append(stream)
        return decode(reply, reply_kind, **context)

    def close(self) -> None:
        """Close every stream and the libp2p host."""
        self.node.shutdown()

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quant_type_names(quant_types: Collection[str] | None) -> frozenset[str] | None:
    """The names of ``allowed_quant_types`` (checked), or None for all of them."""
    if quant_types is None:
        return None
    if isinstance(quant_types, str):
        raise ConfigurationError(f"allowed_quant_types is a list of quant types, e.g. [{quant_types!r}], not one string")
    names = frozenset(parse_quant_type(q).value for q in quant_types)
    if not names:
        raise ConfigurationError("allowed_quant_types is empty: list the quant types to use (none, int8, nf4, fp4), "
                                 "or pass None to use servers of every quant type")
    return names
