"""Per-peer and per-protocol limits: stream quotas, byte rates, sessions, requests in flight, cache shares,
and which idle sessions go first when the cache budget is full."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from jupyter_swarm.client.inference import BUSY_BACKOFF, InferenceSession
from jupyter_swarm.errors import ConfigurationError, RemoteError, ServerBusyError, SessionEvictedError
from jupyter_swarm.p2p.peer_limits import PeerByteRate, StreamCounter, StreamQuota
from jupyter_swarm.runtime.cache_budget import CacheBudget, CacheFullError, CachePeerShareError, SessionTooLargeError
from jupyter_swarm.runtime.fair_compute import FairCompute
from jupyter_swarm.runtime.limits import InFlight, PeerLimitError, ServerLimits
from jupyter_swarm.runtime.sessions import SessionTable


def test_stream_quotas_count_per_peer_and_per_protocol():
    streams = StreamCounter()
    quota = StreamQuota(per_peer=2, total=3)
    assert streams.try_open("/rpc", "a", quota) and streams.try_open("/rpc", "a", quota)
    assert not streams.try_open("/rpc", "a", quota)  # a's third
    assert streams.try_open("/rpc", "b", quota)
    assert not streams.try_open("/rpc", "c", quota)  # the protocol's total
    assert streams.try_open("/push", "c", quota)  # another protocol has its own count
    streams.closed("/rpc", "a")
    assert streams.open_streams("/rpc", "a") == 1 and streams.try_open("/rpc", "c", quota)


def test_a_peer_over_its_byte_rate_waits_and_other_peers_do_not():
    rate = PeerByteRate(bytes_per_second=1000, burst_bytes=2000)
    now = time.time()
    assert rate.delay("a", 1500, now) == 0 and rate.delay("a", 500, now) == 0  # the burst
    assert rate.delay("a", 1000, now) == pytest.approx(1.0)  # then 1000 bytes take a second
    assert rate.delay("b", 2000, now) == 0  # b has its own allowance
    assert rate.delay("a", 1000, now + 1.01) == 0  # refilled
    assert rate.delay("c", 10**9, now) == 0 and rate.delay("c", 10**9, now) > 0  # a huge frame costs one burst


def test_sessions_declare_their_worst_case_per_peer_and_hold_only_what_they_use():
    budget = CacheBudget(1000, peer_share=0.5)
    first = budget.open(400, "a")
    assert budget.used_bytes == 0  # an idle session holds nothing
    with pytest.raises(CachePeerShareError, match="already declare"):
        budget.open(200, "a")  # a's sessions may declare at most 500
    with pytest.raises(SessionTooLargeError, match="whole budget"):
        budget.open(2000, "b")
    second, third = budget.open(500, "b"), budget.open(500, "c")
    first.grow_to(300)
    second.grow_to(10**6)  # never more than it declared
    assert budget.used_bytes == 800 and second.size == 500
    with pytest.raises(CacheFullError, match="server cache is full"):
        third.grow_to(300)
    first.release()
    first.release()  # exactly once
    third.grow_to(300)
    assert budget.declared_by("a") == 0 and budget.free_bytes == 200


def _held(budget: CacheBudget, peer: str, size: int):
    reservation = budget.open(size, peer)
    reservation.grow_to(size)
    return reservation


def test_sessions_per_peer_and_eviction_of_the_longest_idle_first(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    budget = CacheBudget(1000)
    table = SessionTable(per_peer=2, evict_idle_after=1.0)
    a1 = table.add("a", _held(budget, "a", 300))
    a2 = table.add("a", _held(budget, "a", 300))
    with pytest.raises(PeerLimitError, match="2 inference sessions"):
        table.check_room("a")
    b = table.add("b", _held(budget, "b", 300))
    scopes = {s: trio.CancelScope() for s in (a1, a2, b)}
    b.waiting(scopes[b])
    clock[0] += 5
    a1.waiting(scopes[a1])
    clock[0] += 1
    a2.waiting(scopes[a2])
    a2.working()  # a2 computes a step now: never evicted
    assert table.evict_for(800, budget.free_bytes) == 0  # all idle ones would not make room: nobody is touched
    assert not any(s.evicted for s in (a1, a2, b))
    assert table.evict_for(350, budget.free_bytes) == 1  # b has been idle longest
    assert b.evicted and scopes[b].cancel_called and not a1.evicted and budget.free_bytes == 400
    assert table.evict_for(700, budget.free_bytes) == 1 and a1.evicted and len(table) == 1


def test_a_session_idle_for_less_than_the_threshold_is_not_evicted(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    budget = CacheBudget(100)
    table = SessionTable(per_peer=4, evict_idle_after=1.0)
    session = table.add("a", _held(budget, "a", 100))
    session.waiting(trio.CancelScope())
    clock[0] += 0.5
    assert table.evict_for(10, budget.free_bytes) == 0
    clock[0] += 0.6
    assert table.evict_for(10, budget.free_bytes) == 1


def test_requests_in_flight_past_a_peers_limit_wait_for_their_turn():
    in_flight = InFlight(per_peer=2)
    peak = {"a": 0, "b": 0}

    async def request(peer: str) -> None:
        async with in_flight.hold(peer):
            peak[peer] = max(peak[peer], in_flight.serving(peer))
            await trio.sleep(0.01)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(request, "a")
            nursery.start_soon(request, "b")

    trio.run(main)
    assert peak == {"a": 2, "b": 1} and in_flight.serving("a") == 0


def test_limits_from_the_command_line():
    limits = ServerLimits().with_options(["sessions_per_peer=3", "evict-idle-after=0.5"])
    assert limits.sessions_per_peer == 3 and limits.evict_idle_after == 0.5
    with pytest.raises(ConfigurationError, match="expected NAME=VALUE"):
        ServerLimits().with_options(["sessions=3"])
    with pytest.raises(ConfigurationError, match="not a number"):
        ServerLimits().with_options(["sessions_per_peer=many"])
    with pytest.raises(ConfigurationError, match="cache_share_per_peer"):
        ServerLimits().with_options(["cache_share_per_peer=2"])


def test_a_client_replays_after_an_eviction_or_a_busy_server_without_banning_it():
    banned: list[str] = []
    swarm = SimpleNamespace(bans=SimpleNamespace(ban=banned.append), num_blocks=2, active_adapter=None)
    session = InferenceSession(swarm, max_length=8)  # type: ignore[arg-type]

    async def fail_three_ways() -> float:
        await session._note_failure("evicting", SessionEvictedError("evicted your idle inference session"))
        began = trio.current_time()
        await session._note_failure("busy", ServerBusyError("server cache is full"))
        waited = trio.current_time() - began
        await session._note_failure("broken", RemoteError("server error: boom"))
        return waited

    waited = trio.run(fail_three_ways, clock=trio.testing.MockClock(autojump_threshold=0))
    assert banned == ["broken"]  # only the server that failed; the others were short of memory
    assert waited == pytest.approx(2 * BUSY_BACKOFF)  # backs off (more with each failover) before replaying
    assert session.failovers == 3


def test_the_compute_slot_goes_to_the_smallest_call_then_the_peer_that_used_least_recently():
    compute = FairCompute(half_life=10.0)
    order: list[str] = []

    async def call(peer: str, tokens: int, seconds: float) -> None:
        async with compute.turn(peer, tokens):
            order.append(f"{peer}:{tokens}")
            await trio.sleep(seconds)

    async def main() -> None:
        compute.charge("greedy", 5.0)  # its recent compute
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "greedy", 64, 1.0)  # takes the free slot
            await trio.sleep(0.1)
            for tokens in (64, 64, 1):
                nursery.start_soon(call, "greedy", tokens, 1.0)  # queue first ...
                await trio.sleep(0.01)
            nursery.start_soon(call, "honest", 64, 0.01)  # ... a peer that used nothing goes before them at 64
            nursery.start_soon(call, "honest", 1, 0.01)  # ... and its step before the greedy one of the same size
            await trio.sleep(0.1)
            cancelled = trio.CancelScope()

            async def gives_up() -> None:
                with cancelled:
                    await call("quitter", 1, 0.01)

            nursery.start_soon(gives_up)
            await trio.sleep(0.1)
            cancelled.cancel()  # a waiter that gives up leaves the queue and blocks no one

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert order == ["greedy:64", "honest:1", "greedy:1", "honest:64", "greedy:64", "greedy:64"]
    assert compute.usage("greedy") > 1 and compute.usage("honest") > 0  # each call charged to its peer, decaying
    assert compute.try_acquire()  # free again once everyone is done
    compute.release()


def test_a_peer_over_its_fair_share_yields_room_at_once_to_a_lighter_peer(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    budget = CacheBudget(1000)
    table = SessionTable(per_peer=4, evict_idle_after=1.0)
    heavy = [table.add("heavy", _held(budget, "heavy", 300)) for _ in range(2)]
    light = table.add("light", _held(budget, "light", 100))
    middle = table.add("middle", _held(budget, "middle", 300))
    for session in (*heavy, light, middle):
        session.waiting(trio.CancelScope())
    clock[0] += 0.1  # all idle for far less than the threshold
    assert table.evict_for(200, budget.free_bytes) == 0  # without a requester: only long-idle sessions go
    # a newcomer holding 150 once admitted; fair share 1000/4 = 250: only "heavy" (600) is over it and heavier
    assert budget.used_by_peer() == {"heavy": 600, "light": 100, "middle": 300}
    assert table.evict_for(150, budget.free_bytes, peer="newcomer", budget_bytes=1000, held=budget.used_by_peer()) == 1
    assert sum(s.evicted for s in heavy) == 1 and not light.evicted and not middle.evicted
    # "heavy" (300 now) asking for 200 more may not take room from lighter peers that were active just now
    assert table.evict_for(400, budget.free_bytes, peer="heavy", budget_bytes=1000, held=budget.used_by_peer()) == 0
    assert not light.evicted and not middle.evicted
    clock[0] += 1.0  # now idle long enough: anyone may take their room, longest idle first
    assert table.evict_for(400, budget.free_bytes, peer="heavy", budget_bytes=1000, held=budget.used_by_peer()) >= 1
