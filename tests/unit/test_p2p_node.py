"""The bridge from other threads into a P2PNode's trio thread."""

import threading
import time

import pytest
import trio

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.host import P2PNode


def test_calls_return_results_and_raise_the_callees_errors():
    node = P2PNode().start()
    try:
        async def add(a, b):
            await trio.sleep(0)
            return a + b

        async def fail():
            raise ValueError("from the trio thread")

        assert node.call(add, 2, 3) == 5
        assert node.call_sync(lambda: threading.current_thread().name) != threading.current_thread().name
        with pytest.raises(ValueError, match="from the trio thread"):
            node.call(fail)
    finally:
        node.shutdown()


def test_a_call_running_when_the_host_shuts_down_gets_peer_unavailable_and_later_calls_too():
    node = P2PNode().start()
    started, outcome = threading.Event(), []

    async def wait_forever():
        started.set()
        await trio.sleep_forever()

    def caller():
        try:
            node.call(wait_forever)
        except BaseException as e:  # noqa: BLE001 - the test inspects whatever came out
            outcome.append(e)

    thread = threading.Thread(target=caller)
    thread.start()
    assert started.wait(10)
    node.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], PeerUnavailableError), outcome
    with pytest.raises(PeerUnavailableError, match="not running"):
        node.call(wait_forever)


def test_join_tries_the_initial_peers_again_when_none_answered_at_first():
    """A bootstrap node that is not up yet (or dropped the handshake) when a server starts: the server's join tries
    again a second later instead of exiting."""
    import socket

    from jupyter_swarm.p2p.identity import new_identity, peer_id_of

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    identity = new_identity()
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(identity)}"
    joiner = P2PNode().start()
    late: list[P2PNode] = []
    starter = threading.Timer(1.2, lambda: late.append(P2PNode(identity=identity,
                                                               listen=[f"/ip4/127.0.0.1/tcp/{port}"]).start()))
    try:
        starter.start()
        assert joiner.call(joiner.join, [address]) == [peer_id_of(identity)]
    finally:
        starter.join()
        joiner.shutdown()
        for node in late:
            node.shutdown()


def test_a_handler_whose_peer_went_away_inside_a_nursery_is_not_a_failure():
    from jupyter_swarm.p2p.host import _peer_went_away

    gone = PeerUnavailableError("connection to peer X closed while sending")
    assert _peer_went_away(gone) and _peer_went_away(ExceptionGroup("session", [gone, gone]))
    assert not _peer_went_away(ExceptionGroup("session", [gone, ValueError("a bug")]))
    assert not _peer_went_away(ValueError("a bug"))


def test_a_host_keeps_taking_connections_after_more_than_its_cap_came_and_went():
    """py-libp2p's swarm kept a slot of its inbound cap for every connection of its lifetime: with a cap of 2, a
    third peer was refused even after the first two connections had closed. The cap now counts the connections
    open now."""
    import time

    from libp2p.peer.id import ID

    server = P2PNode().start()
    network = server.host.get_network()
    network._inbound_limiter.total_tokens = 2
    clients = []
    try:
        for _ in range(5):  # one after another, each connection closed before the next
            client = P2PNode().start()
            clients.append(client)
            assert client.call(client.connect, server.addrs[0]) == server.peer_id
            client.shutdown()
            deadline = time.monotonic() + 10
            while server.call_sync(lambda: len(network.get_connections())):  # closed (and any redial too)
                assert time.monotonic() < deadline, "the server never closed the connection"
                server.call(network.close_peer, ID.from_base58(client.peer_id))
                time.sleep(0.05)
        together = [P2PNode().start() for _ in range(2)]  # two open at once still fit the cap of 2
        clients += together
        for client in together:
            assert client.call(client.connect, server.addrs[0]) == server.peer_id
    finally:
        for client in clients:
            client.shutdown()
        server.shutdown()


def test_a_background_task_that_fails_is_logged_and_the_node_keeps_running(caplog):
    node = P2PNode().start()
    try:
        async def broken() -> None:
            raise RuntimeError("a bug in a background task")

        node.call_sync(node.spawn, broken)
        other = P2PNode().start()
        try:
            assert other.call(other.connect, node.addrs[0]) == node.peer_id
            assert node.call(node.connect, other.addrs[0]) == other.peer_id  # the node can still dial
        finally:
            other.shutdown()
        assert any("a bug in a background task" in r.getMessage() or "broken" in r.getMessage()
                   for r in caplog.records if r.levelname == "ERROR")
    finally:
        node.shutdown()


def test_a_failing_kademlia_service_is_replaced_and_the_node_keeps_running(caplog):
    node = P2PNode().start()
    try:
        first = node.dht

        async def fail() -> None:
            raise RuntimeError("a bug inside the DHT service")

        node.call_sync(lambda: first.manager.run_task(fail))
        deadline = time.monotonic() + 10
        while node.dht is first:
            assert time.monotonic() < deadline, "the DHT service was not replaced"
            time.sleep(0.05)
        other = P2PNode().start()
        try:
            assert node.call(node.connect, other.addrs[0]) == other.peer_id  # the node still works
        finally:
            other.shutdown()
        assert any("Kademlia DHT service failed" in r.getMessage() for r in caplog.records)
    finally:
        node.shutdown()


def test_a_host_that_met_more_peers_than_its_peerstore_holds_keeps_its_own_keys():
    """py-libp2p's peerstore evicts address-less peers first once it holds max_peers, and a host has no addresses
    of its own there: it evicted itself, and its identify handler then took the host down."""
    import multiaddr
    from libp2p.peer.id import ID

    from jupyter_swarm.p2p.identity import new_identity, peer_id_of

    node = P2PNode().start()
    other = P2PNode().start()
    try:
        peerstore = node.host.get_peerstore()
        peerstore.max_peers = 5

        def meet_many() -> None:
            for port in range(20):
                peer = ID.from_base58(peer_id_of(new_identity()))
                peerstore.add_addrs(peer, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{10000 + port}")], 3600)

        node.call_sync(meet_many)
        assert node.call_sync(node.host.get_public_key) is not None
        assert other.call(other.connect, node.addrs[0]) == node.peer_id  # identify answers, the host is up
        assert node.call(node.connect, other.addrs[0]) == other.peer_id
    finally:
        other.shutdown()
        node.shutdown()
