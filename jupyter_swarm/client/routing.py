"""Choosing servers: a chain of spans that covers a range of blocks.

Inference (:func:`choose_chain`): the chain with the least expected time per generated token. It is a shortest
path over (server, block) -- a DAG in block order, so one pass of dynamic programming finds it:

* entering a server costs half the round-trip time from the previous holder of the hidden states (the client, or
  with server-to-server push the previous server, from its published ``next_pings``) plus a fixed per-message
  overhead; leaving the last server costs half its round-trip time back to the client;
* each block costs 1 / (that server's inference steps per second); staying inside one server's span is free;
* a server whose free cache cannot hold the session costs a large penalty (it would refuse the session).

Round-trip times the client has not measured count as ``DEFAULT_RTT``. Costs separate into a part that depends
only on the server left and a part that depends only on the server entered, so each block is one vectorised
step over the servers holding it (plus the sparse published server-to-server pings): routing a request stays in
the low milliseconds with 1,000 servers.

Forward/backward (:func:`choose_forward_chain`): a random server at each step, weighted by its forward
throughput times the blocks it takes us forward, so many clients' batches spread over servers by capacity.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from jupyter_swarm.dht.records import ServerRecord
from jupyter_swarm.dht.swarm_map import SwarmMap
from jupyter_swarm.errors import MissingBlocksError, format_block_list

DEFAULT_RTT = 0.15  # seconds, for a peer nobody measured (Petals' default)
MAX_RTT = 5.0
MESSAGE_OVERHEAD = 0.018  # seconds per message on top of half the round trip (Petals' figure)
CACHE_PENALTY = 10.0  # seconds added for entering a server that lacks free cache for the session
MIN_RPS = 1e-6


@dataclass(frozen=True)
class SpanRoute:
    """Blocks [start, end) served by one server."""

    peer_id: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return self.end - self.start


def usable_servers(swarm: SwarmMap, *, banned: Collection[str] = frozenset(),
                   allowed: Collection[str] | None = None, blocked: Collection[str] = frozenset()) -> list[ServerRecord]:
    """Online servers a client may use: not banned, on the allow-list (if any), not on the block-list."""
    return [s for s in swarm.online()
            if s.peer_id not in banned and s.peer_id not in blocked and (allowed is None or s.peer_id in allowed)]


def unsuitable_servers(swarm: SwarmMap, *, active_adapter: str | None = None,
                       allowed_quant_types: Collection[str] | None = None) -> set[str]:
    """Servers whose blocks a client's requests cannot use: those without its active LoRA adapter, and those of a
    quant type it does not allow (None: all)."""
    return {s.peer_id for s in swarm.servers.values()
            if (active_adapter is not None and active_adapter not in s.adapters)
            or (allowed_quant_types is not None and s.quant_type not in allowed_quant_types)}


def explain_missing(error: MissingBlocksError, swarm: SwarmMap,
                    allowed_quant_types: Collection[str] | None) -> MissingBlocksError:
    """``error``, or one saying that the missing blocks are served, only not in a quant type the client allows."""
    if allowed_quant_types is None:
        return error
    others = sorted({s.quant_type for s in swarm.online() if s.quant_type not in allowed_quant_types
                     and any(s.start <= b < s.end for b in error.missing)})
    if not others:
        return error
    return MissingBlocksError(error.missing, error.num_servers, (
        f"no online server of quant type {' or '.join(sorted(allowed_quant_types))} covers blocks "
        f"{format_block_list(error.missing)}; servers of quant type {', '.join(others)} do: add them to "
        "allowed_quant_types, or start a server with `jupyter-swarm serve MODEL --quant-type ...`"))


def _check_coverage(servers: list[ServerRecord], start: int, end: int) -> None:
    diff = [0] * (end - start + 1)
    for s in servers:
        lo, hi = max(s.start, start), min(s.end, end)
        if lo < hi:
            diff[lo - start] += 1
            diff[hi - start] -= 1
    missing, running = [], 0
    for i in range(end - start):
        running += diff[i]
        if running <= 0:
            missing.append(start + i)
    if missing:
        raise MissingBlocksError(missing, len({s.peer_id for s in servers}))


def choose_chain(swarm: SwarmMap, start: int, end: int, *, banned: Collection[str] = frozenset(),
                 rng: random.Random | None = None, pings: Mapping[str, float] | None = None,
                 cache_tokens: int | None = None, push: bool = False, allowed: Collection[str] | None = None,
                 blocked: Collection[str] = frozenset()) -> list[SpanRoute]:
    """The fastest chain of online servers for inference over blocks [start, end), or MissingBlocksError.

    ``pings``: the client's smoothed round-trip times (seconds) per peer; ``cache_tokens``: cache the session
    needs (batch x max length); ``push``: hidden states go from server to server (hops cost the servers'
    published pings) rather than through the client.
    """
    servers = usable_servers(swarm, banned=banned, allowed=allowed, blocked=blocked)
    _check_coverage(servers, start, end)
    chosen = [s for s in servers if s.start < end and s.end > start]
    (rng or random.Random()).shuffle(chosen)  # ties between equally good servers go either way
    return _shortest_chain(chosen, start, end, pings or {}, cache_tokens, push)


def _rtt(pings: Mapping[str, float], peer_id: str) -> float:
    value = pings.get(peer_id)
    if value is None or not math.isfinite(value) or value < 0:
        return DEFAULT_RTT
    return min(value, MAX_RTT)


def _shortest_chain(servers: list[ServerRecord], start: int, end: int, pings: Mapping[str, float],
                    cache_tokens: int | None, push: bool) -> list[SpanRoute]:
    n, length = len(servers), end - start
    lo_list = [max(s.start, start) - start for s in servers]
    hi_list = [min(s.end, end) - start for s in servers]
    lo, hi = np.array(lo_list, dtype=np.int64), np.array(hi_list, dtype=np.int64)
    per_block = 1.0 / np.maximum(np.array([s.inference_rps for s in servers], dtype=np.float64), MIN_RPS)
    rtt = np.array([_rtt(pings, s.peer_id) for s in servers], dtype=np.float64)
    penalty = np.zeros(n)
    if cache_tokens is not None:
        penalty = np.where(np.array([s.cache_tokens_left for s in servers]) < cache_tokens, CACHE_PENALTY, 0.0)
    arrive = rtt / 2 + MESSAGE_OVERHEAD + penalty  # client -> server (and the per-message overhead)
    leave = rtt / 2  # server -> client
    # Known server-to-server round trips, used when a server hands its output to the next one at its span's end.
    pushes: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if push:
        index = {s.peer_id: i for i, s in enumerate(servers)}
        found: dict[int, list[tuple[int, int, float]]] = {}
        penalty_list = penalty.tolist()
        for j, s in enumerate(servers):
            boundary = hi_list[j]
            if boundary >= length or not s.next_pings:
                continue
            for peer, ping in s.next_pings.items():
                i = index.get(peer)
                if i is not None and lo_list[i] <= boundary < hi_list[i]:
                    cost = min(ping, MAX_RTT) / 2 + MESSAGE_OVERHEAD + penalty_list[i]
                    found.setdefault(boundary, []).append((j, i, cost))
        for boundary, items in found.items():
            js, is_, costs = zip(*items)
            pushes[boundary] = (np.array(js), np.array(is_), np.array(costs))
    blocks = np.arange(length)
    outside = (blocks[:, None] < lo[None, :]) | (blocks[:, None] >= hi[None, :])  # [block, server]
    stayed = np.zeros((length, n), dtype=bool)
    came_from = [-1] * (length + 1)  # best server to leave at each boundary (-1: the client)
    pushed_from: dict[tuple[int, int], int] = {}
    here = np.full(n, np.inf)  # cost with the output of the previous block held by each server
    best_leave = 0.0
    for b in range(length):
        enter = arrive + best_leave
        if b in pushes:
            js, is_, costs = pushes[b]
            values = here[js] + costs
            for k in np.nonzero(values < enter[is_])[0].tolist():
                i = int(is_[k])
                if values[k] < enter[i]:
                    enter[i] = values[k]
                    pushed_from[(i, b)] = int(js[k])
        stay = here < enter - 1e-12  # on a tie, enter later: a chain stays with a server as long as it can
        stayed[b] = stay
        here = np.where(stay, here, enter)
        here += per_block
        here[outside[b]] = np.inf
        total = here + leave
        j = int(total.argmin())
        came_from[b + 1] = j
        best_leave = float(total[j])
    chain: list[SpanRoute] = []
    i, b, segment_end = came_from[length], length - 1, length
    while b >= 0:
        if stayed[b, i]:
            b -= 1
            continue
        s = servers[i]
        chain.append(SpanRoute(s.peer_id, start + b, start + segment_end, tuple(s.addrs)))
        segment_end = b
        i = pushed_from.get((i, b), came_from[b])
        b -= 1
    chain.reverse()
    return chain


def servers_to_ping(swarm: SwarmMap, start: int, end: int, *, pings: Mapping[str, float],
                    stale: Callable[[str], bool], limit: int, rng: random.Random | None = None, push: bool = False,
                    banned: Collection[str] = frozenset(), allowed: Collection[str] | None = None,
                    blocked: Collection[str] = frozenset()) -> list[str]:
    """Which servers a client should ping next (at most ``limit``, only ``stale`` ones): first those of the chain
    it would choose now, then the other servers holding that chain's hop blocks (the alternatives that matter),
    then the rest at random."""
    rng = rng or random.Random()
    lists = dict(banned=banned, allowed=allowed, blocked=blocked)
    servers = [s for s in usable_servers(swarm, **lists) if s.start < end and s.end > start]
    try:
        chain = choose_chain(swarm, start, end, pings=pings, push=push, rng=rng, **lists)
    except MissingBlocksError:
        chain = []
    hops = {r.start for r in chain} | {r.end - 1 for r in chain}
    near = [s.peer_id for s in servers if any(s.start <= b < s.end for b in hops)]
    others = [s.peer_id for s in servers]
    rng.shuffle(near)
    rng.shuffle(others)
    order: list[str] = []
    seen: set[str] = set()
    for peer in [r.peer_id for r in chain] + near + others:
        if peer not in seen and stale(peer):
            seen.add(peer)
            order.append(peer)
            if len(order) >= limit:
                break
    return order


def chain_latency(chain: list[SpanRoute], swarm: SwarmMap, rtt: Callable[[str, str], float], *, push: bool = False) -> float:
    """Expected seconds per token of ``chain`` under round trips ``rtt(a, b)`` (``"client"`` names the client).

    Used by the simulation to score routes with the true network, not the client's estimate of it.
    """
    total, previous = 0.0, "client"
    for route in chain:
        record = swarm.servers[route.peer_id]
        if push or previous == "client":
            total += rtt(previous, route.peer_id) / 2 + MESSAGE_OVERHEAD
        else:
            total += rtt(previous, "client") / 2 + rtt("client", route.peer_id) / 2 + MESSAGE_OVERHEAD
        total += route.length / max(record.inference_rps, MIN_RPS)
        previous = route.peer_id
    return total + (rtt(previous, "client") / 2 if chain else 0.0)



def choose_forward_chain(swarm: SwarmMap, start: int, end: int, *, banned: Collection[str] = frozenset(),
                         rng: random.Random | None = None, allowed: Collection[str] | None = None,
                         blocked: Collection[str] = frozenset()) -> list[SpanRoute]:
    """A chain for batched forward/backward: at each step a random server holding the next block, chosen with
    probability proportional to its forward throughput times the blocks it covers from there."""
    rng = rng or random.Random()
    servers = usable_servers(swarm, banned=banned, allowed=allowed, blocked=blocked)
    _check_coverage(servers, start, end)
    chain: list[SpanRoute] = []
    block = start
    while block < end:
        candidates = [s for s in servers if s.start <= block < s.end]
        weights = [max(s.forward_rps, MIN_RPS) * (min(s.end, end) - block) for s in candidates]
        server = rng.choices(candidates, weights=weights)[0]
        reach = min(server.end, end)
        chain.append(SpanRoute(server.peer_id, block, reach, tuple(server.addrs)))
        block = reach
    return chain


class BanList:
    """Peers that failed recently, each avoided for a back-off that doubles with every new failure, and peers
    distrusted for good."""

    def __init__(self, base_seconds: float = 15.0, max_seconds: float = 600.0):
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self.distrusted: dict[str, str] = {}  # peer id -> why: banned for good (wrong outputs)

    def ban(self, peer_id: str) -> None:
        strikes = self._strikes.get(peer_id, 0)
        self._strikes[peer_id] = strikes + 1
        self._until[peer_id] = time.monotonic() + min(self.base_seconds * 2**strikes, self.max_seconds)

    def distrust(self, peer_id: str, why: str) -> None:
        """Ban ``peer_id`` for good (it returned wrong outputs, see client/verification.py)."""
        self.distrusted[peer_id] = why

    def succeeded(self, peer_id: str) -> None:
        self._strikes.pop(peer_id, None)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in self._until.items() if until > now}.union(self.distrusted)
