"""Block selection, rebalancing decisions, latency-aware inference routing, forward spreading, pings, throughput."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest
import torch

from jupyter_swarm.client.routing import (BanList, chain_latency, choose_chain, choose_forward_chain)
from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.swarm_map import SwarmMap
from jupyter_swarm.errors import MissingBlocksError
from jupyter_swarm.runtime.block_selection import (block_throughputs, choose_best_start, choose_span, placements,
                                                   should_move, span_length_for_memory)
from jupyter_swarm.p2p.pings import PingAggregator


def rec(peer: str, start: int, end: int, *, rps: float = 1000.0, throughput: float = 1.0,
        state: ServerState = ServerState.ONLINE, cache: int = 10**6, next_pings: dict | None = None,
        forward_rps: float = 1.0) -> ServerRecord:
    return ServerRecord(peer_id=peer, addrs=[], start=start, end=end, state=state, throughput=throughput,
                        inference_rps=rps, forward_rps=forward_rps, cache_tokens_left=cache,
                        next_pings=next_pings or {})


def smap(*records: ServerRecord, num_blocks: int = 8) -> SwarmMap:
    return SwarmMap("m", num_blocks, {r.peer_id: r for r in records})


def spans(chain) -> list[tuple[str, int, int]]:
    return [(r.peer_id, r.start, r.end) for r in chain]


# ---- block selection ---------------------------------------------------------------------------------------

def test_best_start_fills_the_weakest_blocks():
    assert choose_best_start([0.0] * 8, 3) == 0
    assert choose_best_start([5, 5, 5, 0, 0, 5, 5, 5], 3) == 2  # [5,0,0] sorted beats [0,0,5]? equal -> first
    assert choose_best_start([5, 5, 5, 5, 1, 1, 1, 5], 3) == 4
    assert choose_best_start([3, 3, 1, 3], 8) == 0  # longer than the model: the whole model


def test_new_server_takes_the_uncovered_span_and_joining_servers_count():
    records = [rec("a", 0, 4), rec("b", 4, 6, state=ServerState.JOINING)]
    assert choose_span(records, 8, 2) == (6, 8)
    assert choose_span(records + [rec("c", 6, 8, state=ServerState.OFFLINE)], 8, 2) == (6, 8)


def test_memory_sizes_the_span():
    assert span_length_for_memory(10 * 100, 100, 0, 80) == 10
    assert span_length_for_memory(10**12, 100, 0, 80) == 80
    assert span_length_for_memory(50, 100, 0, 80) == 1


def test_balanced_swarm_stays_put():
    records = [rec("a", 0, 4), rec("b", 4, 8), rec("c", 0, 4), rec("d", 4, 8)]
    assert all(should_move(r.peer_id, records, 8, rng=random.Random(0)) is None for r in records)


def test_redundant_server_moves_into_a_hole_but_never_opens_one():
    records = [rec("a", 0, 4), rec("b", 0, 4), rec("c", 4, 6)]  # blocks 6-7 uncovered
    assert should_move("b", records, 8, rng=random.Random(0)) == 4  # 4:8 covers the hole, a keeps 0:4
    assert should_move("c", records, 8, rng=random.Random(0)) is None  # sole holder of 4-5: moving would uncover
    lone = [rec("a", 0, 4), rec("c", 4, 6)]
    assert should_move("a", lone, 8) is None


def test_move_when_the_bottleneck_rises_enough():
    # three servers pile on blocks 0-3, one fast server alone holds 4-7: the bottleneck is 4-7 at throughput 1
    records = [rec("a", 0, 4, throughput=1), rec("b", 0, 4, throughput=1), rec("c", 0, 4, throughput=1),
               rec("d", 4, 8, throughput=1)]
    moved = [p for p in "abc" if should_move(p, records, 8, rng=random.Random(1)) == 4]
    assert moved == ["a", "b", "c"]
    assert block_throughputs(placements(records).values(), 8) == [3, 3, 3, 3, 1, 1, 1, 1]
    # a small gain is not worth a restart
    records = [rec("a", 0, 4, throughput=10), rec("b", 4, 8, throughput=9), rec("c", 0, 8, throughput=1)]
    assert should_move("c", records, 8) is None


# ---- inference routing -------------------------------------------------------------------------------------

def test_fast_servers_beat_fewer_hops_when_compute_dominates():
    m = smap(rec("slow", 0, 8, rps=2.0), rec("f1", 0, 4, rps=100.0), rec("f2", 4, 8, rps=100.0))
    assert spans(choose_chain(m, 0, 8)) == [("f1", 0, 4), ("f2", 4, 8)]
    m = smap(rec("slow", 0, 8, rps=2000.0), rec("f1", 0, 4, rps=4000.0), rec("f2", 4, 8, rps=4000.0))
    assert spans(choose_chain(m, 0, 8)) == [("slow", 0, 8)]  # hops (~0.1 s each) cost more than 1 ms of compute


def test_leaves_a_slow_server_mid_span_for_a_fast_one():
    m = smap(rec("a", 0, 8, rps=1.0), rec("b", 3, 8, rps=1000.0))
    assert spans(choose_chain(m, 0, 8)) == [("a", 0, 3), ("b", 3, 8)]


def test_client_pings_steer_away_from_distant_servers():
    m = smap(rec("a", 0, 8), rec("b", 0, 8))
    assert spans(choose_chain(m, 0, 8, pings={"a": 0.5, "b": 0.01})) == [("b", 0, 8)]
    assert spans(choose_chain(m, 0, 8, pings={"a": 0.01, "b": 0.5})) == [("a", 0, 8)]


def test_servers_published_pings_choose_the_next_server_with_push():
    nxt = {"near": 0.002, "far": 0.8}
    m = smap(rec("a", 0, 4, next_pings=nxt), rec("near", 4, 8), rec("far", 4, 8))
    for seed in range(5):
        assert spans(choose_chain(m, 0, 8, push=True, rng=random.Random(seed)))[1][0] == "near"
    # without push every hop goes through the client, so the client's own pings decide
    chain = choose_chain(m, 0, 8, pings={"a": 0.01, "near": 0.6, "far": 0.01})
    assert chain[1].peer_id == "far"


def test_server_without_free_cache_is_avoided_unless_it_is_the_only_one():
    m = smap(rec("full", 0, 8, cache=10), rec("x", 0, 4, cache=5000), rec("y", 4, 8, cache=5000))
    assert [r.peer_id for r in choose_chain(m, 0, 8, cache_tokens=1000)] == ["x", "y"]
    assert [r.peer_id for r in choose_chain(m, 0, 8, cache_tokens=1)] == ["full"]
    only = smap(rec("full", 0, 8, cache=10))
    assert [r.peer_id for r in choose_chain(only, 0, 8, cache_tokens=1000)] == ["full"]


def test_allow_and_block_lists():
    m = smap(rec("a", 0, 8), rec("b", 0, 4), rec("c", 4, 8))
    assert [r.peer_id for r in choose_chain(m, 0, 8, blocked={"a"})] == ["b", "c"]
    assert [r.peer_id for r in choose_chain(m, 0, 8, allowed={"b", "c"})] == ["b", "c"]
    with pytest.raises(MissingBlocksError, match=r"blocks 4-7 \(1 server\(s\) online\)"):
        choose_chain(m, 0, 8, allowed={"b"})
    assert [r.peer_id for r in choose_forward_chain(m, 0, 8, blocked={"a"})] == ["b", "c"]


def test_sub_range_routes_and_joining_servers_are_skipped():
    m = smap(rec("a", 0, 8, state=ServerState.JOINING), rec("b", 2, 6), rec("c", 5, 8))
    assert spans(choose_chain(m, 3, 7)) == [("b", 3, 6), ("c", 6, 7)]
    with pytest.raises(MissingBlocksError, match="blocks 0-1"):
        choose_chain(m, 0, 8)


def test_routing_is_optimal_against_brute_force():
    rng = random.Random(7)
    for trial in range(30):
        records = []
        for k in range(6):
            start = rng.randrange(0, 6)
            records.append(rec(f"s{k}", start, rng.randrange(start + 1, 7), rps=rng.choice([5.0, 20.0, 100.0])))
        records.append(rec("full", 0, 6, rps=3.0))
        m = smap(*records, num_blocks=6)
        pings = {r.peer_id: rng.uniform(0.001, 0.4) for r in records}
        rtt = lambda a, b: pings[b if a == "client" else a]  # noqa: E731 - client <-> server round trips
        chain = choose_chain(m, 0, 6, pings=pings)
        assert [r.start for r in chain][0] == 0 and chain[-1].end == 6
        got = chain_latency(chain, m, rtt)
        assert got <= _brute_force(m, 6, rtt) + 1e-9, trial


def _brute_force(m: SwarmMap, num_blocks: int, rtt) -> float:
    from jupyter_swarm.client.routing import SpanRoute

    best = float("inf")

    def extend(block: int, chain: list) -> None:
        nonlocal best
        if block == num_blocks:
            best = min(best, chain_latency(chain, m, rtt))
            return
        for s in m.servers.values():
            if s.state == ServerState.ONLINE and s.start <= block < s.end:
                for stop in range(block + 1, s.end + 1):
                    extend(stop, chain + [SpanRoute(s.peer_id, block, stop)])

    extend(0, [])
    return best


def test_routing_1000_servers_gives_a_contiguous_chain():
    # Its speed (~3 ms) is measured in bench/sim_swarm.py; tests assert no timings on this shared machine.
    rng = random.Random(0)
    records = []
    for k in range(1000):
        length = rng.randint(4, 16)
        start = rng.randrange(0, 80 - length + 1)
        nxt = {f"s{rng.randrange(1000)}": rng.uniform(0.001, 0.2) for _ in range(5)}
        records.append(rec(f"s{k}", start, start + length, rps=rng.uniform(5, 50), next_pings=nxt))
    m = smap(*records, num_blocks=80)
    pings = {f"s{k}": rng.uniform(0.001, 0.3) for k in range(0, 1000, 3)}
    choose_chain(m, 0, 80, pings=pings, push=True)
    chain = choose_chain(m, 0, 80, pings=pings, push=True, cache_tokens=100)
    assert chain[0].start == 0 and chain[-1].end == 80
    assert all(a.end == b.start for a, b in zip(chain, chain[1:]))


# ---- forward/backward spreading ------------------------------------------------------------------------

def test_forward_chains_spread_by_throughput():
    m = smap(rec("fast", 0, 8, forward_rps=300.0), rec("slow", 0, 8, forward_rps=100.0))
    counts = Counter(choose_forward_chain(m, 0, 8, rng=random.Random(i))[0].peer_id for i in range(2000))
    assert 0.70 < counts["fast"] / 2000 < 0.80  # 3:1


# ---- bans, pings, throughput cache --------------------------------------------------------------------------

def test_banned_server_is_avoided_then_chosen_again():
    m = smap(rec("a", 0, 8, rps=10_000.0), rec("b", 0, 4), rec("c", 4, 8))
    bans = BanList(base_seconds=0.05)
    bans.ban("a")
    assert [r.peer_id for r in choose_chain(m, 0, 8, banned=bans.banned())] == ["b", "c"]
    time.sleep(0.06)
    assert [r.peer_id for r in choose_chain(m, 0, 8, banned=bans.banned())] == ["a"]


def test_ping_ema_and_expiry():
    agg = PingAggregator(alpha=0.2, expiration=0.05)
    agg.add("a", 1.0)
    agg.add("a", 0.0)
    assert agg.get("a") == pytest.approx(0.8)
    time.sleep(0.06)
    assert agg.get("a") is None and agg.to_dict() == {}
    agg.add("a", 0.3)
    assert agg.get("a") == pytest.approx(0.3)  # an expired average starts over


def test_throughput_is_measured_once_and_cached(tmp_path, monkeypatch):
    from jupyter_swarm.models import BlockSpan, make_tiny_model
    from jupyter_swarm.runtime import throughput

    path = make_tiny_model(str(tmp_path / "m"), num_layers=2)
    span = BlockSpan.load(path, 0, 2)
    cache = tmp_path / "tp.json"
    monkeypatch.setenv(throughput.CACHE_ENV, str(cache))
    first = throughput.get_throughput(span)
    assert first.inference_rps > 0 and first.forward_rps > 0 and first.network_rps > 0
    calls = []
    monkeypatch.setattr(throughput, "measure_compute", lambda *a, **k: calls.append(1) or (1.0, 1.0))
    again = throughput.get_throughput(span)
    assert calls == [] and again.inference_rps == first.inference_rps
    assert len(json.loads(cache.read_text())) == 1
    assert first.throughput(1) > first.throughput(7) or first.throughput(1) == first.network_rps
    cache.write_text("not json")  # a broken cache is re-measured, not fatal
    assert throughput.get_throughput(span).inference_rps == 1.0
    assert torch.get_num_threads() >= 1


def test_a_moving_server_counts_at_its_target_so_others_do_not_follow():
    records = [rec("a", 0, 4), rec("b", 0, 4), rec("c", 0, 4), rec("d", 4, 6)]  # blocks 6-7 uncovered
    assert should_move("b", records, 8, holes_only=True, rng=random.Random(0)) == 4
    records[1] = ServerRecord(**{**records[1].__dict__, "moving_to": 4})
    assert should_move("c", records, 8, holes_only=True, rng=random.Random(0)) is None  # b is on its way
    assert should_move("b", records, 8, rng=random.Random(0)) is None  # already moving


def test_holes_only_check_leaves_a_covered_swarm_alone():
    records = [rec("a", 0, 4, throughput=5), rec("b", 0, 4, throughput=5), rec("c", 4, 8, throughput=1)]
    assert should_move("a", records, 8, holes_only=True) is None
    assert should_move("a", records, 8, rng=random.Random(0)) == 4  # the full check does move it


@pytest.mark.parametrize("bad", [{"moving_to": -1}, {"moving_to": 7}, {"moving_to": "4"},
                                 {"next_pings": {"x": -0.1}}, {"inference_rps": float("inf")}])
def test_records_with_nonsense_placement_fields_are_ignored(bad, caplog):
    data = {**rec("a", 0, 4).to_wire(), **bad}
    assert ServerRecord.from_wire(data, num_blocks=8) is None
    assert "ignoring an invalid swarm record" in caplog.text
