"""A lying replica among real libp2p hosts: it cannot forge, move, extend or erase another peer's record."""

from __future__ import annotations

import time

import pytest
from libp2p.peer.id import ID

from jupyter_swarm.dht.signed_records import sign_record
from jupyter_swarm.dht.store import PROTOCOL, RecordStore
from jupyter_swarm.errors import RemoteError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.messages import pack, unpack


class LyingReplica:
    """Takes every store request, and answers reads with whatever ``answer(key)`` returns ({subkey: blob})."""

    def __init__(self, node: P2PNode):
        self.node = node
        self.received: list[dict[str, bytes]] = []
        self.answer = lambda key: {}
        node.set_handler(PROTOCOL, self.handle)

    async def handle(self, stream) -> None:
        message = unpack(await stream.recv())
        if message["type"] == "store":
            self.received.append(message["values"])
            await stream.send(pack({"type": "stored"}))
        else:
            records = {key: {s: [blob, 3600.0] for s, blob in self.answer(key).items()} for key in message["keys"]}
            await stream.send(pack({"type": "found", "records": records}))


@pytest.fixture
def swarm():
    nodes = [P2PNode().start() for _ in range(4)]
    alice_node, honest_node, liar_node, reader_node = nodes
    alice, honest = RecordStore(alice_node), RecordStore(honest_node)
    liar = LyingReplica(liar_node)
    reader = RecordStore(reader_node, serve=False)
    for node in (alice_node, reader_node):
        for replica in (honest_node, liar_node):
            node.call(node.connect, replica.addrs[0])
    yield alice, honest, liar, reader
    for node in nodes:
        node.shutdown()


def read(store: RecordStore, key: str) -> dict[str, bytes]:
    return {subkey: value for subkey, (value, _ttl) in store.node.call(store.get_many, [key])[key].items()}


def test_a_lying_replica_cannot_forge_move_replay_or_erase(swarm) -> None:
    alice, honest, liar, reader = swarm
    a = alice.node.peer_id
    assert alice.node.call(alice.put_many, {"m.0": b"online v1", "x.0": b"other model"}, 30.0) == 3
    first = next(values["m.0"] for values in liar.received if "m.0" in values)
    moved = next(values["x.0"] for values in liar.received if "x.0" in values)
    alice.node.call(alice.put_many, {"m.0": b"online v2"}, 30.0)

    forged_by_liar = sign_record(liar.node.identity, ["m.0"], b"alice is offline", ttl=30)
    for lie in ({a: forged_by_liar}, {a: moved}, {a: first}, {a: b"garbage"}, {}):
        liar.answer = lambda key, lie=lie: lie
        assert read(reader, "m.0") == {a: b"online v2"}, lie  # the honest replica's newest record wins

    # alone, the liar can withhold the record or replay the older one (until it expires), nothing more
    honest.local = type(honest.local)()
    alice.local = type(alice.local)()  # the writer holds its own record too, and honest introduced it
    liar.answer = lambda key: {a: first}
    assert read(reader, "m.0") == {a: b"online v1"}
    liar.answer = lambda key: {a: forged_by_liar}
    assert read(reader, "m.0") == {}


def test_a_replica_only_stores_records_their_sender_signed(swarm) -> None:
    alice, honest, liar, reader = swarm
    alice_record = sign_record(alice.node.identity, ["m.0"], b"alice", ttl=30)
    liar.node.call(liar.node.connect, honest.node.addrs[0])

    async def store_as_liar(values: dict[str, bytes], ttl: float) -> None:
        payload = await liar.node.request(honest.node.peer_id, PROTOCOL,
                                          pack({"type": "store", "values": values, "ttl": ttl}), 5.0)
        unpack(payload, "stored")

    with pytest.raises(RemoteError, match="signature is not"):  # a replay of alice's record, sent by someone else
        liar.node.call(store_as_liar, {"m.0": alice_record}, 30.0)
    own = sign_record(liar.node.identity, ["m.0"], b"liar", ttl=30)
    with pytest.raises(RemoteError, match="ttl"):
        liar.node.call(store_as_liar, {"m.0": own}, float("nan"))
    liar.node.call(store_as_liar, {"m.0": own}, 30.0)  # its own record, under its own sub-key, is fine
    assert set(honest.local.get("m.0")) == {liar.node.peer_id}


def test_a_dead_replica_is_replaced_by_the_next_closest_and_set_aside(monkeypatch) -> None:
    import jupyter_swarm.dht.store as store_module

    monkeypatch.setattr(store_module, "REPLICAS", 1)  # one replica per key: the closest, unless it fails
    nodes = [P2PNode().start() for _ in range(4)]
    try:
        writer, first, second, reader = (RecordStore(nodes[0]), RecordStore(nodes[1]), RecordStore(nodes[2]),
                                         RecordStore(nodes[3], serve=False))
        for replica in (first, second):
            for store in (writer, reader):
                store.node.call(store.node.connect, replica.node.addrs[0])
        for replica in (first, second):
            replica.local.put("m.0", writer.node.peer_id,
                              sign_record(writer.node.identity, ["m.0"], b"hello", ttl=30), 30.0)
        closest, other = sorted((first, second), key=lambda r: store_module._distance(r.node.peer_id.encode(), b"m.0"))
        deadline = time.monotonic() + 10
        while not {first.node.peer_id, second.node.peer_id} <= reader.candidates():  # identify runs after a dial
            assert time.monotonic() < deadline, "the reader never learned that both replicas hold records"
            time.sleep(0.05)
        closest.node.shutdown()
        assert read(reader, "m.0") == {writer.node.peer_id: b"hello"}  # from `other`, in the second round
        assert closest.node.peer_id not in reader.replicas_for("m.0", include_self=False)
        assert reader._strikes[closest.node.peer_id] == 1
    finally:
        for node in nodes:
            node.shutdown()


def test_a_map_read_asks_the_servers_it_finds_for_the_records_its_first_replicas_lack() -> None:
    """The reader knows one replica, which holds server A's record only; B's record sits on A alone (the writer's
    and the reader's views differ). One read_swarm() finds both: A's signed record gives A's address."""
    from jupyter_swarm.dht.records import ServerRecord, ServerState
    from jupyter_swarm.dht.swarm_map import block_key, encode_record, read_swarm

    nodes = [P2PNode().start() for _ in range(4)]
    try:
        replica, a, b, reader = (RecordStore(nodes[0]), RecordStore(nodes[1]), RecordStore(nodes[2]),
                                 RecordStore(nodes[3], serve=False))

        def hold(store: RecordStore, server: RecordStore, start: int, end: int) -> None:
            record = ServerRecord(peer_id=server.node.peer_id, addrs=server.node.addrs, start=start, end=end,
                                  state=ServerState.ONLINE, throughput=1.0)
            keys = [block_key("m", block) for block in range(start, end)]
            blob = sign_record(server.node.identity, keys, encode_record(record), ttl=30)
            for key in keys:
                store.local.put(key, server.node.peer_id, blob, 30.0)

        hold(replica, a, 0, 1)
        hold(a, b, 1, 2)
        reader.node.call(reader.node.connect, replica.node.addrs[0])
        swarm = reader.node.call(read_swarm, reader, "m", 2)
        assert set(swarm.servers) == {a.node.peer_id, b.node.peer_id}
        assert swarm.missing_blocks() == []
    finally:
        for node in nodes:
            node.shutdown()


def test_a_replica_that_died_does_not_come_back_from_the_routing_table_once_set_aside_no_longer() -> None:
    """Under churn the routing table and peerstore remember every server ever met; a dead one must not return to
    the replica sets when its time set aside runs out, or the dead crowd out the live."""
    nodes = [P2PNode().start() for _ in range(3)]
    try:
        dead, alive, reader = RecordStore(nodes[0]), RecordStore(nodes[1]), RecordStore(nodes[2], serve=False)
        for replica in (dead, alive):
            reader.node.call(reader.node.connect, replica.node.addrs[0])
        deadline = time.monotonic() + 10
        while not {dead.node.peer_id, alive.node.peer_id} <= reader.candidates():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        read(reader, "m.0")  # both answer: known to hold records
        dead.node.shutdown()
        # a process that dies has its sockets closed by the kernel; a node shut down in this process does not
        reader.node.call(reader.node.host.get_network().close_peer, ID.from_base58(dead.node.peer_id))
        read(reader, "m.0")  # the dead one fails this read and is set aside
        assert reader._strikes.get(dead.node.peer_id) == 1
        reader._failing[dead.node.peer_id] = 0.0  # its time set aside is over
        assert dead.node.peer_id not in reader.candidates()
        assert alive.node.peer_id in reader.candidates()
    finally:
        for node in nodes:
            node.shutdown()
