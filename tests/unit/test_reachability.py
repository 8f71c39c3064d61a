"""Reachability: announced addresses, AutoNAT verdicts (p2p/autonat.py), dialing with bounded retries
(p2p/dialing.py), initial peers as configuration, and the reachability field of records."""

from __future__ import annotations

import socket
import threading
import time

import multiaddr
import pytest
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.peer.id import ID

from jupyter_swarm.dht.records import ServerRecord
from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p import dialing
from jupyter_swarm.p2p.addresses import (
    AnnouncedAddresses, default_listen, interface_addrs, is_wildcard, resolve_initial_peers)
from jupyter_swarm.p2p.autonat import ReachabilityProbe, Verdict
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.identity import new_identity
from jupyter_swarm.p2p.reachability import NetworkOptions

PEER = "12D3KooWFy8BjPcNCDW5uEPyzrqWqjycHgv1FWC7Kx8jQ1Jbunp5"


# ---- addresses ----------------------------------------------------------------------------------------------------
def test_local_swarms_listen_on_loopback_and_others_on_every_interface():
    assert default_listen([]) == ["/ip4/127.0.0.1/tcp/0"]
    assert default_listen([f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"]) == ["/ip4/127.0.0.1/tcp/0"]
    assert default_listen([f"/ip4/203.0.113.1/tcp/4001/p2p/{PEER}"]) == ["/ip4/0.0.0.0/tcp/0"]
    assert default_listen([f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", f"/dns4/boot.example/tcp/1/p2p/{PEER}"]) == [
        "/ip4/0.0.0.0/tcp/0"]


def test_a_wildcard_listen_address_is_never_announced():
    expanded = interface_addrs([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4321")])
    assert expanded and not any(is_wildcard(a) for a in expanded)
    assert all(str(a).endswith("/tcp/4321") for a in expanded)
    book = AnnouncedAddresses()
    book.attach(lambda: [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4321")])
    book.set_confirmed([multiaddr.Multiaddr("/ip4/198.51.100.7/tcp/4321")])
    book.set_circuits([multiaddr.Multiaddr(f"/ip4/198.51.100.1/tcp/1/p2p/{PEER}/p2p-circuit")])
    announced = [str(a) for a in book.announced()]
    assert announced[0] == "/ip4/198.51.100.7/tcp/4321"  # confirmed public first, circuits last
    assert announced[-1].endswith("/p2p-circuit") and "0.0.0.0" not in " ".join(announced)
    assert all("/p2p-circuit" not in str(a) for a in book([]))  # identify gets the direct ones only


def test_a_node_on_all_interfaces_announces_neither_the_wildcard_nor_loopback():
    node = P2PNode(listen=["/ip4/0.0.0.0/tcp/0"], network=NetworkOptions(local=True)).start()
    try:
        assert node.addrs and not any("/ip4/0.0.0.0/" in a or "/ip4/127." in a for a in node.addrs), node.addrs
    finally:
        node.shutdown()


def test_initial_peers_come_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.setenv("JUPYTER_SWARM_INITIAL_PEERS", f"/ip4/203.0.113.1/tcp/1/p2p/{PEER}, /ip4/203.0.113.2/tcp/1/p2p/{PEER}")
    assert len(resolve_initial_peers(None)) == 2
    assert resolve_initial_peers(["/ip4/1.2.3.4/tcp/1"]) == ["/ip4/1.2.3.4/tcp/1"]
    monkeypatch.delenv("JUPYTER_SWARM_INITIAL_PEERS")
    assert resolve_initial_peers([]) == []


def test_records_carry_a_known_reachability():
    record = ServerRecord(peer_id=PEER, addrs=[], start=0, end=2, reachability="relayed", relay=True)
    parsed = ServerRecord.from_wire(record.to_wire(), num_blocks=4)
    assert parsed is not None and parsed.reachability == "relayed" and parsed.relay is True
    assert ServerRecord.from_wire({**record.to_wire(), "reachability": "teleported"}, num_blocks=4) is None
    assert ServerRecord.from_wire({**record.to_wire(), "relay": "yes"}, num_blocks=4) is None


# ---- AutoNAT --------------------------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dial_back_uses_a_fresh_connection(connected_nodes):
    server, client = connected_nodes("/test/none/1", lambda stream: None)
    nowhere = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{_closed_port()}").to_bytes()
    real = multiaddr.Multiaddr(client.addrs[0].rsplit("/p2p/", 1)[0]).to_bytes()
    ours = server.reach.autonat  # type: ignore[union-attr]
    client_id = ID.from_base58(client.peer_id)

    async def until_connected() -> None:  # the server registers the inbound connection a moment after the client
        with trio.fail_after(10):
            while server.link(client.peer_id) is None:
                await trio.sleep(0.05)

    server.call(until_connected)
    # py-libp2p's own dial-back "reaches" any address: host.connect returns the connection the request came on
    assert server.call(AutoNATService._try_dial, ours, client_id, [nowhere]) == nowhere
    assert server.call(ours._try_dial, client_id, [nowhere]) is None
    assert server.call(ours._try_dial, client_id, [real]) == real
    assert server.call_sync(server.link, client.peer_id) == "direct"  # the requester's connection is untouched


def test_peers_on_its_own_network_do_not_make_a_peer_public():
    """Two peers reach this one at 127.0.0.1: that proves nothing about the internet, so no vote (on a LAN, a
    notebook next to a server was otherwise told it is public). The public case runs across namespaces in
    tests/integration/test_nat.py."""
    nodes = [P2PNode(network=NetworkOptions(local=False, use_relays=False, hole_punching=False)).start()
             for _ in range(3)]
    try:
        for other in nodes[1:]:
            nodes[0].call(nodes[0].connect, other.addrs[0])
        probe = nodes[0].reach.probe  # type: ignore[union-attr]

        async def wait_asked() -> None:
            with trio.fail_after(20):
                while len(probe.asked) < 2:
                    await trio.sleep(0.1)
                await trio.sleep(1.0)  # their answers arrive

        nodes[0].call(wait_asked)
        assert nodes[0].call_sync(lambda: (nodes[0].reach.status, dict(probe.verdicts), nodes[0].reach.relaying)) == (
            "unknown", {}, False)
    finally:
        for node in nodes:
            node.shutdown()


def test_reachability_needs_more_than_one_verdict():
    probe = ReachabilityProbe.__new__(ReachabilityProbe)
    probe.required, probe.verdicts = 2, {}
    now = time.monotonic()
    assert probe.status == "unknown"
    probe.verdicts["a"] = Verdict(True, "/ip4/198.51.100.7/tcp/1", now)
    assert probe.status == "unknown"  # one peer is not enough
    probe.verdicts["b"] = Verdict(True, "/ip4/198.51.100.7/tcp/1", now)
    assert probe.status == "public"
    assert [str(a) for a in probe.confirmed_addrs()] == ["/ip4/198.51.100.7/tcp/1"]
    probe.verdicts = {"a": Verdict(False, None, now), "b": Verdict(False, None, now)}
    assert probe.status == "private"
    probe.verdicts["c"] = Verdict(True, "/ip4/198.51.100.7/tcp/1", now)
    assert probe.status == "unknown"  # disagreement
    probe.verdicts = {p: Verdict(True, None, now - 3600) for p in "abc"}
    assert probe.status == "unknown"  # verdicts expire


# ---- round trips --------------------------------------------------------------------------------------------------
def test_a_failed_ping_is_retried_soon_and_a_changed_path_is_measured_anew(monkeypatch):
    from jupyter_swarm.p2p import pings

    clock = [1000.0]
    monkeypatch.setattr(pings.time, "monotonic", lambda: clock[0])
    aggregator = pings.PingAggregator()
    aggregator.add("direct", 0.010)
    aggregator.failed("relayed")  # its first ping timed out while the relayed connection was being made
    assert not aggregator.stale("direct", 60) and not aggregator.stale("relayed", 60)
    clock[0] += pings.RETRY_FAILED_AFTER + 1
    assert aggregator.stale("relayed", 60) and not aggregator.stale("direct", 60)
    aggregator.add("relayed", 0.080)
    clock[0] += pings.RETRY_FAILED_AFTER + 1
    assert not aggregator.stale("relayed", 60)  # measured now: the usual refresh period applies
    aggregator.forget("relayed")  # a hole punch made it direct
    assert aggregator.get("relayed") is None and aggregator.stale("relayed", 60)


# ---- dialing ------------------------------------------------------------------------------------------------------
@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never says a word (a blackhole for a libp2p handshake)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for s in accepted:
        s.close()
    sock.close()


def test_an_address_that_cannot_be_dialed_is_given_up_quickly_and_not_retried_at_once(silent_listener, monkeypatch):
    monkeypatch.setattr(dialing, "DIRECT_TIMEOUT", 1.0)
    node = P2PNode().start()
    try:
        node.reach.dialer.direct_timeout = 1.0  # type: ignore[union-attr]
        peer = str(ID.from_pubkey(new_identity().public_key))
        node.call_sync(node.remember_addrs, peer, [f"/ip4/127.0.0.1/tcp/{silent_listener}",
                                                  f"/ip4/127.0.0.1/tcp/{_closed_port()}"])
        began = time.monotonic()
        with pytest.raises(PeerUnavailableError, match="could not connect"):
            node.call(node.dial, peer)
        assert time.monotonic() - began < 5
        began = time.monotonic()
        with pytest.raises(PeerUnavailableError, match="can be dialed now.*recently failed"):
            node.call(node.dial, peer)
        assert time.monotonic() - began < 0.5
        dialer = node.reach.dialer  # type: ignore[union-attr]
        assert dialer.skipped(f"/ip4/127.0.0.1/tcp/{silent_listener}") is not None
        for failure in dialer._failures.values():  # the back-off doubles, up to an hour: retried, never in a loop
            failure.until = 0
        with pytest.raises(PeerUnavailableError, match="could not connect"):
            node.call(node.dial, peer)
        assert {f.strikes for f in dialer._failures.values()} == {2}
    finally:
        node.shutdown()


def test_a_peer_is_reached_through_its_relay_when_its_direct_address_fails(silent_listener):
    from jupyter_swarm.p2p.relay_client import reserve
    from jupyter_swarm.p2p.relay_service import RelayServiceLimits

    relay = P2PNode(network=NetworkOptions(relay_service=True, relay_limits=RelayServiceLimits())).start()
    server, client = P2PNode().start(), P2PNode().start()
    try:
        server.call(server.connect, relay.addrs[0])
        circuit = str(server.call(reserve, server.host, relay.peer_id).circuits[0])
        client.reach.dialer.direct_timeout = 1.0  # type: ignore[union-attr]
        client.call_sync(client.remember_addrs, server.peer_id, [f"/ip4/127.0.0.1/tcp/{silent_listener}", circuit])
        client.call(client.dial, server.peer_id)
        assert client.call_sync(client.link, server.peer_id) == "relayed"
    finally:
        for node in (client, server, relay):
            node.shutdown()
