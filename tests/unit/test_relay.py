"""The relay service and client (p2p/relay_service.py, p2p/relay_client.py) and hole punching's relay hand-over
(p2p/holepunch.py), with real libp2p hosts on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p import holepunch
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.reachability import NetworkOptions
from jupyter_swarm.p2p.relay_client import RelayRefusedError, dial_through_relay, reserve
from jupyter_swarm.p2p.relay_service import RelayServiceLimits

ECHO = "/test/echo/1"


async def _echo(stream) -> None:
    async for frame in stream.frames():
        await stream.send(frame)


@pytest.fixture
def nodes() -> Iterator[Callable[..., P2PNode]]:
    """``make(relay_limits=None)``: a started loopback node (a relay when limits are given), shut down after."""
    started: list[P2PNode] = []

    def make(relay_limits: RelayServiceLimits | None = None, **options: object) -> P2PNode:
        network = NetworkOptions(relay_service=relay_limits is not None, use_relays=False,
                                 relay_limits=relay_limits or RelayServiceLimits(), **options)  # type: ignore[arg-type]
        node = P2PNode(network=network).start()
        node.set_handler(ECHO, _echo)
        started.append(node)
        return node

    yield make
    for node in reversed(started):
        node.shutdown()


def _reserve(node: P2PNode, relay: P2PNode) -> str:
    """Connect ``node`` to ``relay``, take a slot; returns ``node``'s circuit address through it."""
    node.call(node.connect, relay.addrs[0])
    reservation = node.call(reserve, node.host, relay.peer_id)
    return f"{reservation.circuits[0]}/p2p/{node.peer_id}"


def _circuit(client: P2PNode, circuit: str) -> None:
    client.call(dial_through_relay, client.host, circuit)


def _echo_once(client: P2PNode, peer: str, payload: bytes = b"hello") -> bytes:
    async def run() -> bytes:
        stream = await client.open_stream(peer, ECHO)
        try:
            await stream.send(payload)
            return await stream.recv()
        finally:
            await stream.close()

    return client.call(run)


def _relay(node: P2PNode):
    return node.reach.relay  # type: ignore[union-attr]


def test_a_circuit_carries_streams_and_is_seen_as_relayed(nodes):
    relay, server, client = nodes(RelayServiceLimits()), nodes(), nodes()
    circuit = _reserve(server, relay)
    _circuit(client, circuit)
    assert _echo_once(client, server.peer_id) == b"hello"
    assert client.call_sync(client.link, server.peer_id) == "relayed"
    assert server.call_sync(server.link, client.peer_id) == "relayed"


def test_a_reservation_is_for_the_connected_peer_not_the_one_it_names(nodes):
    relay, server, other = nodes(RelayServiceLimits()), nodes(), nodes()
    server.call(server.connect, relay.addrs[0])

    async def reserve_for_someone_else() -> int:
        stream = await server.host.new_stream(ID.from_base58(relay.peer_id), [HOP])
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                     peer=CircuitPeerId(id=ID.from_base58(other.peer_id).to_bytes())))
        answer = await read_delimited_msg(stream, HopMessage)
        await stream.close()
        return answer.status

    assert server.call(reserve_for_someone_else) == 100  # OK: a slot, but for the peer that asked
    manager = _relay(relay).resource_manager
    assert relay.call_sync(lambda: manager.get_reservation(ID.from_base58(server.peer_id))) is not None
    assert relay.call_sync(lambda: manager.get_reservation(ID.from_base58(other.peer_id))) is None


def test_ending_one_circuit_leaves_another_to_the_same_peer_open(nodes):
    relay, server, first, second = nodes(RelayServiceLimits()), nodes(), nodes(), nodes()
    circuit = _reserve(server, relay)
    _circuit(first, circuit)
    _circuit(second, circuit)
    assert _echo_once(first, server.peer_id) == b"hello"

    async def open_session():  # a stream that lives on the second circuit (a re-dial could not hide its loss)
        stream = await second.open_stream(server.peer_id, ECHO)
        await stream.send(b"before")
        assert await stream.recv() == b"before"
        return stream

    session = second.call(open_session)
    # The server hangs up on the first client: that circuit ends at the relay. py-libp2p's relay files circuits by
    # peer id, so it also closed the second one (the last filed under the server's id).
    server.call(lambda: server.host.get_network().close_peer(ID.from_base58(first.peer_id)))

    async def use_session() -> bytes:
        await trio.sleep(0.5)
        await session.send(b"after")
        return await session.recv()

    assert second.call(use_session) == b"after"


def test_circuit_and_reservation_limits(nodes):
    limits = RelayServiceLimits(max_reservations=2, max_circuits_per_peer=1, reservations_per_minute=3)
    relay = nodes(limits)
    servers = [nodes() for _ in range(3)]
    client, other_client = nodes(), nodes()
    circuits = [_reserve(s, relay) for s in servers[:2]]
    servers[2].call(servers[2].connect, relay.addrs[0])
    with pytest.raises(RelayRefusedError, match="RESOURCE_LIMIT_EXCEEDED"):  # a third slot
        servers[2].call(reserve, servers[2].host, relay.peer_id)
    _circuit(client, circuits[0])
    with pytest.raises(PeerUnavailableError, match="RESOURCE_LIMIT_EXCEEDED"):  # a 2nd circuit from one peer
        _circuit(client, circuits[1])
    with pytest.raises(PeerUnavailableError, match="RESOURCE_LIMIT_EXCEEDED"):  # a 2nd circuit to one peer
        _circuit(other_client, circuits[0])
    assert _echo_once(client, servers[0].peer_id) == b"hello"  # the circuit within the limits still works
    for _ in range(2):  # refreshing counts against the per-minute allowance (the first reserve was one)
        servers[0].call(reserve, servers[0].host, relay.peer_id)
    with pytest.raises(RelayRefusedError, match="RESERVATION_REFUSED"):
        servers[0].call(reserve, servers[0].host, relay.peer_id)
    stats = relay.call_sync(lambda: dict(_relay(relay).stats))
    assert stats["circuits_refused"] >= 1 and stats["reservations_refused"] >= 2, stats


def test_a_circuit_ends_at_its_data_and_duration_limits(nodes):
    relay = nodes(RelayServiceLimits(max_circuit_bytes=64 * 1024, max_circuit_seconds=3))
    server, client = nodes(), nodes()
    circuit = _reserve(server, relay)
    _circuit(client, circuit)
    with pytest.raises(PeerUnavailableError):
        _echo_once(client, server.peer_id, bytes(200 * 1024))
    assert client.call_sync(client.link, server.peer_id) is None  # the circuit, hence the connection, is gone

    _circuit(client, circuit)
    assert _echo_once(client, server.peer_id) == b"hello"

    async def wait_for_disconnect() -> float:
        began = trio.current_time()
        with trio.fail_after(10):
            while client.link(server.peer_id) is not None:
                await trio.sleep(0.1)
        return trio.current_time() - began

    assert client.call(wait_for_disconnect) < 5


def test_hop_refused_when_the_relay_service_is_off(nodes):
    not_a_relay, server = nodes(), nodes()
    server.call(server.connect, not_a_relay.addrs[0])
    with pytest.raises(PeerUnavailableError):
        server.call(reserve, server.host, not_a_relay.peer_id)


def test_after_a_direct_connection_the_relayed_one_closes_only_once_idle(nodes, monkeypatch):
    monkeypatch.setattr(holepunch, "RELAY_CLOSE_GRACE", 0.2)
    monkeypatch.setattr(holepunch, "IDLE_CHECK_PERIOD", 0.2)
    relay = nodes(RelayServiceLimits())
    server, client = nodes(local=False, hole_punching=True), nodes(local=False, hole_punching=True)
    circuit = _reserve(server, relay)
    _circuit(client, circuit)

    async def open_relayed_session():
        stream = await client.open_stream(server.peer_id, ECHO)
        await stream.send(b"on the relay")
        assert await stream.recv() == b"on the relay"
        return stream

    session = client.call(open_relayed_session)

    # what a successful hole punch leaves: a second, direct connection
    client.call(lambda: client.host.get_network().dial_addr(_direct_addr(server), ID.from_base58(server.peer_id)))
    assert client.call_sync(client.link, server.peer_id) in ("direct", "hole-punched")
    puncher = client.reach.puncher  # type: ignore[union-attr]
    assert puncher is not None

    async def hand_over() -> None:
        with trio.move_on_after(1.0):  # with the session's stream open, the relayed connection stays
            await puncher._close_relayed_conns_after_grace(ID.from_base58(server.peer_id))
        await session.send(b"still relayed")
        assert await session.recv() == b"still relayed"
        await session.close()
        with trio.fail_after(5):  # once idle, it is closed
            await puncher._close_relayed_conns_after_grace(ID.from_base58(server.peer_id))

    client.call(hand_over)
    kinds = client.call_sync(lambda: [holepunch.is_relayed(c) for c in
                                      client.host.get_network().connections[ID.from_base58(server.peer_id)]])
    assert kinds == [False]
    assert _echo_once(client, server.peer_id) == b"hello"


def test_py_libp2p_closes_a_busy_relayed_connection(nodes):
    """Why HolePuncher changes the hand-over: py-libp2p's own version closes the relayed connection while a stream
    (an inference session) still runs on it."""
    relay = nodes(RelayServiceLimits())
    server, client = nodes(local=False, hole_punching=True), nodes(local=False, hole_punching=True)
    _circuit(client, _reserve(server, relay))

    async def run() -> bool:
        stream = await client.open_stream(server.peer_id, ECHO)
        await client.host.get_network().dial_addr(_direct_addr(server), ID.from_base58(server.peer_id))
        await DCUtRProtocol._close_relayed_conns_after_grace(client.reach.puncher, ID.from_base58(server.peer_id),
                                                             grace=0.1)
        try:
            await stream.send(b"x")
            await stream.recv()
            return True
        except PeerUnavailableError:
            return False

    assert client.call(run) is False


def _direct_addr(node: P2PNode):
    import multiaddr

    return multiaddr.Multiaddr(node.addrs[0].rsplit("/p2p/", 1)[0])


def test_guards_find_the_internals_they_patch():
    from jupyter_swarm.p2p import relay_service

    assert relay_service.internals_supported()
    assert holepunch.internals_supported()
