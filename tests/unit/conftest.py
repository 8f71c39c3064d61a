"""Unit-test fixtures shared across modules."""

from collections.abc import Callable, Iterator

import pytest

from jupyter_swarm.p2p.host import P2PNode


@pytest.fixture
def connected_nodes() -> Iterator[Callable[[str, Callable], tuple[P2PNode, P2PNode]]]:
    """``make(protocol, handler)``: a (server, client) pair of real libp2p hosts on loopback, the server answering
    ``protocol`` with ``handler`` and the client connected to it; both are shut down after the test."""
    started: list[P2PNode] = []

    def make(protocol: str, handler: Callable) -> tuple[P2PNode, P2PNode]:
        server, client = P2PNode().start(), P2PNode().start()
        started.extend([client, server])
        server.set_handler(protocol, handler)
        client.call(client.connect, server.addrs[0])
        return server, client

    yield make
    for node in started:
        node.shutdown()
