"""Server records, the local record store, the swarm map and the choice of a chain of servers."""

import time

import pytest

from jupyter_swarm.client.routing import BanList, choose_chain
from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.store import LocalRecords
from jupyter_swarm.dht.swarm_map import SwarmMap, decode_record, encode_record
from jupyter_swarm.errors import MissingBlocksError


def record(peer: str, start: int, end: int, state=ServerState.ONLINE, throughput: float = 1.0) -> ServerRecord:
    return ServerRecord(peer_id=peer, addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], start=start, end=end, state=state,
                        throughput=throughput)


def swarm(*records: ServerRecord, num_blocks: int = 8) -> SwarmMap:
    return SwarmMap("m", num_blocks, {r.peer_id: r for r in records})


def test_record_round_trip():
    r = record("a", 2, 5, throughput=3.5)
    assert decode_record(encode_record(r), num_blocks=8) == r


@pytest.mark.parametrize("bad", [
    {"peer_id": "a", "start": 3, "end": 2},
    {"peer_id": "a", "start": 0, "end": 2, "throughput": -1},
    {"peer_id": "a", "start": 0, "end": 2, "throughput": float("nan")},
    {"peer_id": "a", "start": "0", "end": 2},
    {"peer_id": "a", "start": 0, "end": 99},
    {"peer_id": 7, "start": 0, "end": 2},
    {"peer_id": "a", "start": 0, "end": 2, "state": "sleeping"},
    "not a map",
])
def test_nonsense_records_are_ignored_with_a_warning(bad, caplog):
    assert ServerRecord.from_wire(bad, num_blocks=8) is None
    assert "ignoring an invalid swarm record" in caplog.text


def test_local_records_expire():
    store = LocalRecords()
    store.put("k", "a", b"1", ttl=0.05)
    store.put("k", "b", b"2", ttl=10)
    assert set(store.get("k")) == {"a", "b"}
    time.sleep(0.06)
    assert set(store.get("k")) == {"b"}


def test_chain_takes_fewest_hops_and_skips_joining_and_banned():
    m = swarm(record("a", 0, 4), record("b", 4, 8), record("c", 0, 8, state=ServerState.JOINING),
              record("d", 2, 8))
    chain = choose_chain(m, 0, 8)
    assert [(r.start, r.end) for r in chain] == [(0, 4), (4, 8)]
    assert chain[0].peer_id == "a" and chain[1].peer_id in {"b", "d"}
    with pytest.raises(MissingBlocksError, match="blocks 0-1"):  # "c" covers them but is still joining
        choose_chain(m, 0, 8, banned={"a"})


def test_sub_span_routes_start_inside_a_server_span():
    m = swarm(record("a", 0, 3), record("d", 2, 8))
    chain = choose_chain(m, 0, 8)
    assert [(r.peer_id, r.start, r.end) for r in chain] == [("a", 0, 3), ("d", 3, 8)]


def test_missing_blocks_error_names_blocks_and_server_count():
    with pytest.raises(MissingBlocksError, match=r"blocks 3-5 \(2 server\(s\) online\)") as info:
        choose_chain(swarm(record("a", 0, 3), record("b", 6, 8)), 0, 8)
    assert info.value.missing == [3, 4, 5]
    assert swarm(record("a", 0, 3), record("b", 6, 8)).missing_blocks() == [3, 4, 5]


def test_ban_back_off_doubles_and_expires():
    bans = BanList(base_seconds=0.05)
    bans.ban("a")
    assert bans.banned() == {"a"}
    time.sleep(0.06)
    assert bans.banned() == set()
    bans.ban("a")  # second strike: 0.1 s
    time.sleep(0.06)
    assert bans.banned() == {"a"}
