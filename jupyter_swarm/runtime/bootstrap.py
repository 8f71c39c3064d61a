"""A bootstrap node: a public peer that holds no blocks but keeps the swarm's records, relays for peers behind NAT
and answers their AutoNAT requests (``jupyter-swarm bootstrap``)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.identity import load_or_create_identity, new_identity
from jupyter_swarm.p2p.reachability import NetworkOptions
from jupyter_swarm.p2p.swarm_key import SwarmKey, resolve_swarm_key
from jupyter_swarm.runtime.bandwidth import serve_speedtest
from jupyter_swarm.wire.protocols import SPEEDTEST, SPEEDTEST_STREAMS

logger = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP_LISTEN = "/ip4/0.0.0.0/tcp/31337"


@dataclass
class BootstrapConfig:
    """What ``jupyter-swarm bootstrap`` runs with; the relay service is on unless ``network.relay_service`` is
    False."""

    listen: list[str] = field(default_factory=lambda: [DEFAULT_BOOTSTRAP_LISTEN])
    initial_peers: list[str] = field(default_factory=list)  # other bootstrap nodes of the same swarm
    announce_addrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    swarm_key: str | SwarmKey | None = None  # a private swarm's key file; None: $JUPYTER_SWARM_KEY or an open swarm
    network: NetworkOptions = field(default_factory=lambda: NetworkOptions(relay_service=True, use_relays=False))


class BootstrapNode:
    """Runs until :meth:`stop`: a DHT server and record store, the relay service and AutoNAT dial-backs."""

    def __init__(self, config: BootstrapConfig):
        self.config = config
        self.node: P2PNode | None = None
        self.store: RecordStore | None = None
        self._stop = threading.Event()

    def start(self) -> "BootstrapNode":
        cfg = self.config
        identity = load_or_create_identity(cfg.identity_path) if cfg.identity_path else new_identity()
        self.node = P2PNode(identity=identity, listen=cfg.listen, announce=cfg.announce_addrs, dht_server=True,
                            swarm_key=resolve_swarm_key(cfg.swarm_key), network=cfg.network).start()
        try:
            self.store = RecordStore(self.node, serve=True)
            # servers joining through it measure their link
            self.node.set_handler(SPEEDTEST, serve_speedtest, SPEEDTEST_STREAMS)
            if cfg.initial_peers:
                self.node.call(self.node.join, cfg.initial_peers)
        except BaseException:
            self.node.shutdown()
            raise
        return self

    @property
    def peer_id(self) -> str:
        assert self.node is not None
        return self.node.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.node.addrs if self.node else []

    def run_forever(self) -> None:
        """Block until :meth:`request_stop` (e.g. from a signal handler) or :meth:`stop`."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        node, self.node = self.node, None
        if node is not None:
            node.shutdown()
