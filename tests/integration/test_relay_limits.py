"""A bootstrap node's relay service under load and at its limits (`jupyter-swarm bootstrap` on loopback)."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.identity import new_identity
from jupyter_swarm.p2p.relay_client import dial_through_relay, reserve
from tests.support.nat_swarm import BootstrapProcess

pytestmark = pytest.mark.integration

ECHO = "/test/echo/1"


async def _echo(stream) -> None:
    async for frame in stream.frames():
        await stream.send(frame)


@pytest.fixture
def bootstrap():
    node = BootstrapProcess(["--listen", "/ip4/127.0.0.1/tcp/0", "--relay-max-circuits", "1",
                             "--relay-max-reservations", "8"]).wait_ready()
    yield node
    node.kill()


@pytest.fixture
def peers():
    started: list[P2PNode] = []

    def make() -> P2PNode:
        node = P2PNode().start()
        node.set_handler(ECHO, _echo)
        started.append(node)
        return node

    yield make
    for node in started:
        node.shutdown()


def _echo_once(client: P2PNode, peer: str) -> bytes:
    async def run() -> bytes:
        stream = await client.open_stream(peer, ECHO)
        await stream.send(b"ping")
        answer = await stream.recv()
        await stream.close()
        return answer

    return client.call(run)


def test_bootstrap_stays_up_under_200_reservation_attempts_from_one_peer(bootstrap, peers):
    attacker = peers()
    attacker.call(attacker.connect, bootstrap.addrs[0])
    others = [str(ID.from_pubkey(new_identity().public_key)) for _ in range(200)]

    async def flood() -> dict[int, int]:
        statuses: dict[int, int] = {}

        async def one(i: int) -> None:
            try:
                stream = await attacker.host.new_stream(ID.from_base58(bootstrap.peer_id), [HOP])
                # every other request claims to reserve for someone else
                claim = {"peer": CircuitPeerId(id=ID.from_base58(others[i]).to_bytes())} if i % 2 else {}
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE, **claim))
                answer = await read_delimited_msg(stream, HopMessage)
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
                await stream.close()
            except Exception:  # noqa: BLE001 - a reset stream is an answer too
                statuses[-1] = statuses.get(-1, 0) + 1

        with trio.fail_after(60):
            for batch in range(20):
                async with trio.open_nursery() as nursery:
                    for i in range(batch * 10, batch * 10 + 10):
                        nursery.start_soon(one, i)
        return statuses

    statuses = attacker.call(flood)
    assert sum(statuses.values()) == 200
    assert statuses.get(100, 0) <= 12, statuses  # OK: within the per-minute allowance, all for the attacker itself
    assert bootstrap.process.poll() is None
    # others still get slots and circuits through it
    server, client = peers(), peers()
    server.call(server.connect, bootstrap.addrs[0])
    circuit = f"{server.call(reserve, server.host, bootstrap.peer_id).circuits[0]}/p2p/{server.peer_id}"
    client.call(dial_through_relay, client.host, circuit)
    assert _echo_once(client, server.peer_id) == b"ping"


def test_a_relay_refuses_circuits_beyond_its_limits(bootstrap, peers):
    servers = [peers(), peers()]
    circuits = []
    for server in servers:
        server.call(server.connect, bootstrap.addrs[0])
        circuits.append(f"{server.call(reserve, server.host, bootstrap.peer_id).circuits[0]}/p2p/{server.peer_id}")
    client, second_client = peers(), peers()
    client.call(dial_through_relay, client.host, circuits[0])
    with pytest.raises(PeerUnavailableError, match="RESOURCE_LIMIT_EXCEEDED"):  # --relay-max-circuits 1: from a peer
        client.call(dial_through_relay, client.host, circuits[1])
    with pytest.raises(PeerUnavailableError, match="RESOURCE_LIMIT_EXCEEDED"):  # ... and to a peer
        second_client.call(dial_through_relay, second_client.host, circuits[0])
    assert _echo_once(client, servers[0].peer_id) == b"ping"
    assert bootstrap.process.poll() is None
