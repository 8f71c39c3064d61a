#!/usr/bin/env python
"""Simulated swarms (no network, no model) driven by the real block-selection and routing code.

    python bench/sim_swarm.py                          # 10, 100 and 1,000 servers, 80 blocks, writes plotly HTML + JSON
    python bench/sim_swarm.py --sizes 10 100 --minutes 60 --out bench/results/sim

Each swarm has heterogeneous servers (throughput log-normal, span length 10-30 blocks, positions on a plane that
give every pair of peers a round-trip time) and churn: servers live an exponential lifetime and new ones join to
keep the population, each placing itself with :func:`choose_span` on the records it can see (joining servers
count; dead servers stay visible until their records expire). Every server re-checks its place every
uniform(0, 2 x balance period) seconds with :func:`should_move` and, when it moves, keeps serving its old span
while it loads the new one (``load`` seconds). Reported, per swarm size:

* bottleneck throughput of the live swarm (its least-served block) relative to an upper bound on any placement of
  the same servers: sum(throughput x span length) / blocks;
* the fraction of time some block had no live online server;
* routing time per request (:func:`choose_chain` over the visible records, with and without server-to-server push);
* the true expected time per token of the chosen route against the best route under the true round trips (the
  same dynamic programme given every round trip) and against the old fewest-hops rule.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jupyter_swarm.client.routing import SpanRoute, chain_latency, choose_chain, servers_to_ping  # noqa: E402
from jupyter_swarm.dht.records import ServerRecord, ServerState  # noqa: E402
from jupyter_swarm.dht.swarm_map import SwarmMap  # noqa: E402
from jupyter_swarm.errors import MissingBlocksError  # noqa: E402
from jupyter_swarm.runtime.block_selection import choose_span, should_move  # noqa: E402

NUM_BLOCKS = 80


@dataclass
class SimServer:
    peer_id: str
    throughput: float
    inference_rps: float
    length: int
    xy: tuple[float, float]
    start: int = 0
    state: ServerState = ServerState.JOINING
    alive: bool = True
    died_at: float = math.inf
    pending_start: int | None = None  # a move in progress: the new span's start (old span still served)
    pings: dict[str, float] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.length

    def record(self) -> ServerRecord:
        return ServerRecord(peer_id=self.peer_id, addrs=[], start=self.start, end=self.end, state=self.state,
                            throughput=self.throughput, inference_rps=self.inference_rps,
                            forward_rps=self.throughput, cache_tokens_left=10**6, next_pings=dict(self.pings),
                            moving_to=self.pending_start)


class Sim:
    def __init__(self, n: int, *, seed: int, minutes: float, update_period: float, balance_period: float,
                 lifetime_minutes: float, load_seconds: float, hole_checks: bool = True, random_pings: bool = False):
        self.rng = random.Random(seed)
        self.random_pings = random_pings
        self.hole_checks = hole_checks
        self.n, self.duration = n, minutes * 60
        self.update_period, self.balance_period = update_period, balance_period
        self.ttl = 2 * update_period
        self.lifetime, self.load = lifetime_minutes * 60, load_seconds
        self.servers: dict[str, SimServer] = {}
        self.events: list[tuple[float, int, str, str]] = []
        self.counter = 0
        self.now = 0.0
        self.client_xy = (0.5, 0.5)
        self.moves = 0
        self.joins = 0
        self.leaves = 0
        self.should_move_seconds: list[float] = []

    # ---- the world ----------------------------------------------------------------------------------------
    def new_server(self) -> SimServer:
        k = self.counter
        self.counter += 1
        throughput = self.rng.lognormvariate(0, 0.6)
        return SimServer(peer_id=f"s{k}", throughput=throughput, inference_rps=100 * throughput,
                         length=self.rng.randint(10, 30), xy=(self.rng.random(), self.rng.random()))

    def rtt(self, a: str, b: str) -> float:
        """True round trip between two peers: 4 ms plus 0.2 s per unit of distance on the plane."""
        pa = self.client_xy if a == "client" else self.servers[a].xy
        pb = self.client_xy if b == "client" else self.servers[b].xy
        return 0.004 + 0.2 * math.dist(pa, pb)

    def push(self, at: float, kind: str, peer: str) -> None:
        self.counter += 1
        heapq.heappush(self.events, (at, self.counter, kind, peer))

    def visible(self) -> list[ServerRecord]:
        """What the swarm's records say now: dead servers linger until their records expire."""
        return [s.record() for s in self.servers.values() if s.alive or self.now < s.died_at + self.ttl]

    def live_online(self) -> list[SimServer]:
        return [s for s in self.servers.values() if s.alive and s.state == ServerState.ONLINE]

    def join(self) -> None:
        server = self.new_server()
        server.start = choose_span(self.visible(), NUM_BLOCKS, server.length)[0]
        self.servers[server.peer_id] = server
        self.joins += 1
        self.push(self.now + self.load, "online", server.peer_id)
        self.push(self.now + self.rng.expovariate(1 / self.lifetime), "leave", server.peer_id)
        self.push(self.now + self.rng.uniform(0, 2 * self.balance_period), "check", server.peer_id)
        self.push(self.now + self.rng.uniform(0, self.update_period), "ping", server.peer_id)

    def handle(self, kind: str, peer: str) -> None:
        if kind == "join":
            self.join()
            self.push(self.now + self.rng.expovariate(self.n / self.lifetime), "join", "")
            return
        server = self.servers.get(peer)
        if server is None or not server.alive:
            return
        if kind == "online":
            server.state = ServerState.ONLINE
        elif kind == "leave":
            server.alive, server.died_at = False, self.now
            self.leaves += 1
        elif kind == "check":
            if server.state == ServerState.ONLINE and server.pending_start is None:
                records = self.visible()
                began = time.perf_counter()
                new_start = should_move(peer, records, NUM_BLOCKS, rng=self.rng)
                self.should_move_seconds.append(time.perf_counter() - began)
                if new_start is not None:
                    server.pending_start = new_start
                    self.push(self.now + self.load, "moved", peer)
            self.push(self.now + self.rng.uniform(0, 2 * self.balance_period), "check", peer)
        elif kind == "moved":
            server.start, server.pending_start = server.pending_start or 0, None
            server.pings = {}
            self.moves += 1
        elif kind == "ping":  # measure the servers holding the next block, as real servers do
            if server.end < NUM_BLOCKS:
                nxt = [s.peer_id for s in self.servers.values()
                       if s.alive and s.start <= server.end < s.end and s.peer_id != peer]
                self.rng.shuffle(nxt)
                server.pings = {p: self.rtt(peer, p) * self.rng.uniform(0.9, 1.1) for p in nxt[:5]}
            if self.hole_checks and server.state == ServerState.ONLINE and server.pending_start is None:
                new_start = should_move(peer, self.visible(), NUM_BLOCKS, rng=self.rng, holes_only=True)
                if new_start is not None:
                    server.pending_start = new_start
                    self.push(self.now + self.load, "moved", peer)
            self.push(self.now + self.update_period, "ping", peer)

    # ---- measurements -------------------------------------------------------------------------------------
    def bottleneck(self) -> tuple[float, float]:
        live = self.live_online()
        diff = [0.0] * (NUM_BLOCKS + 1)
        for s in live:
            diff[s.start] += s.throughput
            diff[s.end] -= s.throughput
        running, lowest = 0.0, math.inf
        for b in range(NUM_BLOCKS):
            running += diff[b]
            lowest = min(lowest, running)
        bound = sum(s.throughput * s.length for s in live) / NUM_BLOCKS
        return max(0.0, lowest if lowest > 1e-9 else 0.0), bound

    def route_sample(self, requests: int) -> list[dict]:
        records = self.visible()
        swarm = SwarmMap("sim", NUM_BLOCKS, {r.peer_id: r for r in records})
        live = {s.peer_id for s in self.live_online()}
        true_swarm = SwarmMap("sim", NUM_BLOCKS, {r.peer_id: r for r in records if r.peer_id in live})
        best_push_swarm = self.with_all_pings(true_swarm)
        out = []
        for _ in range(requests):
            self.client_xy = (self.rng.random(), self.rng.random())
            banned = {p for p in swarm.servers if p not in live}  # a client learns dead servers by failing
            # what a client knows: smoothed pings (10% noise) to the 32 servers it pinged before its first route
            # (chosen by servers_to_ping, or at random with --random-pings), then 16 more pinged in the background
            pings: dict[str, float] = {}
            for limit in (32, 16):
                if self.random_pings:
                    ids = [p for p in swarm.servers if p not in pings]
                    self.rng.shuffle(ids)
                    chosen = ids[:limit]
                else:
                    chosen = servers_to_ping(swarm, 0, NUM_BLOCKS, pings=pings, stale=lambda p: p not in pings,
                                             limit=limit, rng=self.rng, banned=banned)
                pings.update({p: self.rtt("client", p) * self.rng.uniform(0.9, 1.1) for p in chosen})
            result = {}
            try:
                for push in (False, True):
                    began = time.perf_counter()
                    chain = choose_chain(swarm, 0, NUM_BLOCKS, pings=pings, push=push, banned=banned, rng=self.rng)
                    elapsed = time.perf_counter() - began
                    got = chain_latency(chain, true_swarm, self.rtt, push=push)
                    best = self.best_latency(best_push_swarm if push else true_swarm, push)
                    result[f"push={push}"] = dict(route_ms=elapsed * 1e3, latency=got, best=best, hops=len(chain))
                greedy = fewest_hops_chain(true_swarm, self.rng)
                result["fewest_hops_latency"] = chain_latency(greedy, true_swarm, self.rtt)
            except MissingBlocksError:
                continue
            out.append(result)
        return out

    def with_all_pings(self, swarm: SwarmMap) -> SwarmMap:
        """The swarm as if every server published its true round trip to every server of its next block."""
        by_block: list[list[str]] = [[] for _ in range(NUM_BLOCKS)]
        for peer, r in swarm.servers.items():
            for b in range(r.start, r.end):
                by_block[b].append(peer)
        full = {}
        for peer, r in swarm.servers.items():
            nxt = {q: self.rtt(peer, q) for q in (by_block[r.end] if r.end < NUM_BLOCKS else ()) if q != peer}
            full[peer] = ServerRecord(**{**r.__dict__, "next_pings": nxt})
        return SwarmMap("sim", NUM_BLOCKS, full)

    def best_latency(self, swarm: SwarmMap, push: bool) -> float:
        """The route the same programme finds when it knows every true round trip."""
        pings = {p: self.rtt("client", p) for p in swarm.servers}
        chain = choose_chain(swarm, 0, NUM_BLOCKS, pings=pings, push=push)
        return chain_latency(chain, swarm, self.rtt, push=push)

    def run(self, *, sample_every: float, route_requests: int) -> dict:
        for _ in range(self.n):  # the swarm forms: servers join one after another, 2 s apart
            self.join()
            self.now += 2.0
            while self.events and self.events[0][0] <= self.now:
                at, _, kind, peer = heapq.heappop(self.events)
                self.handle(kind, peer)
        self.now += self.load  # the last ones finish loading
        while self.events and self.events[0][0] <= self.now:
            at, _, kind, peer = heapq.heappop(self.events)
            self.handle(kind, peer)
        self.push(self.now + self.rng.expovariate(self.n / self.lifetime), "join", "")
        formed_at = self.now
        samples = []
        uncovered_time, last_t, last_uncovered = 0.0, self.now, False
        next_sample = self.now
        end = formed_at + self.duration
        while self.now < end:
            at, _, kind, peer = heapq.heappop(self.events)
            if last_uncovered:
                uncovered_time += min(at, end) - last_t
            self.now = last_t = min(at, end)
            while next_sample <= self.now:
                bottleneck, bound = self.bottleneck()
                routes = self.route_sample(route_requests)
                samples.append(dict(t=next_sample - formed_at, bottleneck=bottleneck, bound=bound,
                                    live=len(self.live_online()), routes=routes))
                next_sample += sample_every
            self.handle(kind, peer)
            last_uncovered = self.bottleneck()[0] <= 0 if self.n <= 100 or kind in ("leave", "moved", "online") \
                else last_uncovered
        return dict(samples=samples, uncovered_fraction=uncovered_time / self.duration, moves=self.moves,
                    joins=self.joins, leaves=self.leaves,
                    should_move_ms=statistics.median(self.should_move_seconds) * 1e3 if self.should_move_seconds
                    else None)


def fewest_hops_chain(swarm: SwarmMap, rng: random.Random) -> list[SpanRoute]:
    """The previous rule (kept as a baseline): from each block, the server that reaches furthest."""
    chain, block, online = [], 0, swarm.online()
    while block < NUM_BLOCKS:
        candidates = [s for s in online if s.start <= block < s.end]
        reach = max(s.end for s in candidates)
        best = [s for s in candidates if s.end == reach]
        server = max(best, key=lambda s: (s.throughput, rng.random()))
        chain.append(SpanRoute(server.peer_id, block, reach))
        block = reach
    return chain


def summarise(n: int, result: dict) -> dict:
    samples = result["samples"]
    ratios = [s["bottleneck"] / s["bound"] for s in samples if s["bound"] > 0]
    routes = [r for s in samples for r in s["routes"]]

    def stat(values: list[float]) -> dict:
        values = sorted(values)
        return dict(median=statistics.median(values), p90=values[int(0.9 * (len(values) - 1))],
                    max=values[-1]) if values else {}

    summary = dict(
        servers=n, samples=len(samples), joins=result["joins"], leaves=result["leaves"], moves=result["moves"],
        bottleneck_over_bound=stat(ratios), bottleneck_over_bound_mean=statistics.fmean(ratios) if ratios else None,
        uncovered_fraction=result["uncovered_fraction"], should_move_ms_median=result["should_move_ms"])
    for push in (False, True):
        key = f"push={push}"
        summary[key] = dict(
            route_ms=stat([r[key]["route_ms"] for r in routes]),
            latency_over_best=stat([r[key]["latency"] / r[key]["best"] for r in routes]),
            hops=stat([r[key]["hops"] for r in routes]),
            latency_s=stat([r[key]["latency"] for r in routes]))
    summary["fewest_hops_over_best"] = stat([r["fewest_hops_latency"] / r["push=False"]["best"] for r in routes])
    return summary


def plot(results: dict[int, dict], out: Path) -> list[str]:
    """Three interactive plotly charts as HTML files (plotly is a dependency of the notebook extra; no image
    export engine needed)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    files = []
    fig = go.Figure()
    for n, result in results.items():
        samples = result["samples"]
        fig.add_scatter(x=[s["t"] / 60 for s in samples], name=f"{n} servers", mode="lines",
                        y=[s["bottleneck"] / s["bound"] if s["bound"] else 0.0 for s in samples])
    fig.update_layout(title="Swarm throughput relative to the best any placement could do",
                      xaxis_title="minutes (with churn)", yaxis_title="bottleneck / upper bound",
                      yaxis_range=[0, 1.05])
    files.append(str(out / "sim_bottleneck.html"))
    fig.write_html(files[-1])

    titles = ("through the client", "server-to-server push")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for n, result in results.items():
        routes = [r for s in result["samples"] for r in s["routes"]]
        for col, key in enumerate(("push=False", "push=True"), start=1):
            values = sorted(r[key]["latency"] / r[key]["best"] for r in routes)
            fig.add_scatter(x=values, y=[i / max(1, len(values) - 1) for i in range(len(values))], mode="lines",
                            name=f"{n} servers", legendgroup=str(n), showlegend=col == 1, row=1, col=col)
    for col in (1, 2):
        fig.update_xaxes(title_text="chosen route latency / best route latency", row=1, col=col)
        fig.update_yaxes(title_text="fraction of requests", row=1, col=col)
    files.append(str(out / "sim_route_latency.html"))
    fig.write_html(files[-1])

    fig = go.Figure()
    sizes = list(results)
    for key in ("push=False", "push=True"):
        fig.add_scatter(x=sizes, mode="lines+markers", name=key,
                        y=[statistics.median(r[key]["route_ms"] for s in results[n]["samples"] for r in s["routes"])
                           for n in sizes])
    fig.update_layout(xaxis_type="log", xaxis_title="servers", yaxis_title="routing time per request (ms, median)")
    files.append(str(out / "sim_routing_time.html"))
    fig.write_html(files[-1])
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--minutes", type=float, nargs="+", default=[120, 60, 20],
                        help="simulated minutes per size (one value for all, or one per size)")
    parser.add_argument("--lifetime-minutes", type=float, default=60, help="mean server lifetime (churn)")
    parser.add_argument("--update-period", type=float, default=60)
    parser.add_argument("--balance-period", type=float, default=120)
    parser.add_argument("--load-seconds", type=float, default=30)
    parser.add_argument("--sample-every", type=float, default=60)
    parser.add_argument("--route-requests", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-pings", action="store_true",
                        help="the client pings random servers instead of those servers_to_ping picks")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sim"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minutes = args.minutes if len(args.minutes) == len(args.sizes) else [args.minutes[0]] * len(args.sizes)
    results, summaries = {}, {}
    for n, mins in zip(args.sizes, minutes):
        began = time.perf_counter()
        sim = Sim(n, seed=args.seed + n, minutes=mins, update_period=args.update_period,
                  balance_period=args.balance_period, lifetime_minutes=args.lifetime_minutes,
                  load_seconds=args.load_seconds, random_pings=args.random_pings)
        results[n] = sim.run(sample_every=args.sample_every, route_requests=args.route_requests)
        summaries[n] = summarise(n, results[n])
        summaries[n]["simulated_minutes"] = mins
        summaries[n]["wall_seconds"] = time.perf_counter() - began
        print(json.dumps(summaries[n], indent=1), flush=True)
    files = plot(results, out)
    (out / "sim_summary.json").write_text(json.dumps(dict(args=vars(args), summaries=summaries), indent=1))
    print("wrote", *files, out / "sim_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
