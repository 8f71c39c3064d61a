"""The bandwidth speed test between two real libp2p hosts on loopback."""

import pytest

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.runtime.bandwidth import measure_bandwidth, measure_bandwidth_to_any, serve_speedtest
from jupyter_swarm.wire.protocols import SPEEDTEST


@pytest.fixture
def nodes(connected_nodes):
    return connected_nodes(SPEEDTEST, serve_speedtest)


def test_speed_test_measures_a_positive_finite_bandwidth(nodes):
    server, client = nodes
    mbps = client.call(measure_bandwidth, client, server.peer_id, 2**20)
    assert 1.0 < mbps < 1e6  # loopback through py-libp2p: hundreds of Mbit/s


def test_unreachable_peers_give_none_and_a_refusing_peer_is_skipped(nodes):
    server, client = nodes
    other = P2PNode().start()  # serves no speed test
    try:
        client.call(client.connect, other.addrs[0])
        assert client.call(measure_bandwidth_to_any, client, [other.peer_id]) is None
        assert client.call(measure_bandwidth_to_any, client, [other.peer_id, server.peer_id]) > 1.0
        with pytest.raises(PeerUnavailableError):
            client.call(measure_bandwidth, client, other.peer_id)
    finally:
        other.shutdown()


def test_a_joining_server_measures_its_bandwidth_against_the_swarm(tmp_path):
    from jupyter_swarm.models import make_tiny_model
    from jupyter_swarm.runtime.server import BlockServer, ServerConfig

    path = make_tiny_model(str(tmp_path / "tiny"), num_layers=2)
    first = BlockServer(ServerConfig(path, 0, 1, throughput=None)).start()
    try:
        second = BlockServer(ServerConfig(path, 1, 2, initial_peers=first.addrs)).start()
        try:
            assert first.measured_bandwidth_mbps is None  # a new swarm has nobody to measure against
            assert second.measured_bandwidth_mbps is not None and second.measured_bandwidth_mbps > 1.0
        finally:
            second.stop()
    finally:
        first.stop()
