"""Reachable by default: AutoNAT, relay reservations, relay service and hole punching, run together for one host.

Every few seconds (then every 15 s) a peer that is not on loopback:

1. asks peers it is directly connected to whether they can dial it back (p2p/autonat.py); it is *public* once two
   of them reached it;
2. while it is not public (and ``use_relays``), holds slots on up to two relays (p2p/relay_client.py) and announces
   circuit addresses through them; once public, it drops them;
3. runs the relay service for others (p2p/relay_service.py) when ``relay_service`` is True (bootstrap nodes), or,
   by default, once it is public;
4. upgrades relayed connections to direct ones by hole punching (p2p/holepunch.py), unless ``hole_punching`` is off.

Peers of a local swarm (listening on loopback only) do none of this: their status is "local".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.tools.anyio_service import background_trio_service

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p import holepunch, relay_service
from jupyter_swarm.p2p.addresses import AnnouncedAddresses
from jupyter_swarm.p2p.autonat import DialBackService, ReachabilityProbe
from jupyter_swarm.p2p.dialing import Dialer, connection_kind
from jupyter_swarm.p2p.holepunch import HolePuncher
from jupyter_swarm.p2p.relay_client import RelayReservations
from jupyter_swarm.p2p.relay_service import RelayService, RelayServiceLimits

logger = logging.getLogger(__name__)

FIRST_PERIOD = 1.0
STEADY_PERIOD = 15.0
STATUSES = ("local", "public", "relayed", "private", "unknown")


@dataclass
class NetworkOptions:
    """How a peer makes itself reachable and what it does for others (``jupyter-swarm serve --help``)."""

    use_relays: bool = True  # --no-relay: never reserve relay slots (others reach this peer only directly)
    relays: list[str] = field(default_factory=list)  # --relay MADDR...: reserve only on these
    relay_service: bool | None = None  # relay for others: None = once public; False: --no-relay-service
    relay_limits: RelayServiceLimits = field(default_factory=RelayServiceLimits)
    hole_punching: bool = True  # --no-hole-punching
    autonat: bool = True  # ask peers to dial back (clients, which need not be reachable, do not)
    local: bool | None = None  # a local swarm (none of the above); None: when listening on loopback only
    max_relays: int = 2
    autonat_confirmations: int = 2


class Reachability:
    """The reachability services of one host (see the module docstring); owned by its P2PNode."""

    def __init__(self, host: Any, options: NetworkOptions, addresses: AnnouncedAddresses, *, local: bool,
                 connect: Callable[[str], Any]):
        self.host = host
        self.options = options
        self.addresses = addresses
        self.local = local
        self._connect = connect  # P2PNode.connect (dials a full address)
        self.relay = RelayService(host, options.relay_limits)
        self.autonat = DialBackService(host, serve=not local)
        self.probe = ReachabilityProbe(self.autonat, required=options.autonat_confirmations)
        self.dialer = Dialer(host, relaying=True, local_only=local)
        self.puncher: HolePuncher | None = None
        if options.hole_punching and not local:
            if holepunch.internals_supported():
                self.puncher = HolePuncher(host, known_to_fail=lambda a: self.dialer.skipped(a) is not None)
            else:
                logger.warning("py-libp2p's DCUtR has changed; hole punching is off (connections stay relayed)")
        self.reservations = RelayReservations(host, max_relays=options.max_relays)
        self.initial_peers: list[str] = []  # peers we joined through: relay candidates
        self.known_relays: list[str] = []  # peers announced as relays (their records)
        self._explicit_relays: list[str] = []
        self.changed = trio.Event()
        self.link_listeners: list[Callable[[str], None]] = []  # called (on the trio thread) when a peer's path changes
        if self.puncher is not None:
            self.puncher.on_punched = self._link_changed

    # ---- status ----------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """One of "local", "public", "relayed" (behind NAT, reachable through relays), "private" (others cannot
        dial it and it holds no relay slot) or "unknown" (no verdict yet)."""
        if self.local:
            return "local"
        verdict = "public" if self.addresses.static else self.probe.status
        if verdict == "public":
            return "public"
        if self.reservations.held:
            return "relayed"
        return verdict

    @property
    def relaying(self) -> bool:
        """Whether this peer relays for others now."""
        return self.relay.hop_enabled

    def link(self, peer_id: str) -> str | None:
        """How this peer reaches ``peer_id`` now: "direct", "hole-punched", "relayed", or None."""
        kind = connection_kind(self.host, peer_id)
        if kind == "direct" and self.puncher is not None and peer_id in self.puncher.punched:
            return "hole-punched"
        return kind

    # ---- running ---------------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.relay))
            if self.puncher is not None:
                await stack.enter_async_context(background_trio_service(self.puncher))
            if self.options.relay_service:
                self._enable_hop()
            task_status.started()
            if self.local:
                await trio.sleep_forever()
            await self._connect_explicit_relays()
            period = FIRST_PERIOD
            while True:
                try:
                    await self.step()
                except Exception:  # noqa: BLE001 - retried next period
                    logger.exception("reachability check failed")
                with trio.move_on_after(period):
                    await self.changed.wait()
                self.changed = trio.Event()
                period = min(period * 1.5, STEADY_PERIOD)

    async def wait_settled(self, timeout: float) -> str:
        """Wait (at most ``timeout`` s) until this peer knows it is public, or holds a relay slot, or has nowhere
        to get one; returns the status then."""
        with trio.move_on_after(timeout):
            while not self._settled():
                await trio.sleep(0.1)
        return self.status

    def _settled(self) -> bool:
        if self.status in ("local", "public", "relayed"):
            return True
        # Behind NAT (or not yet known) without a slot: settled once every candidate relay has been asked.
        untried = [p for p in self._relay_candidates() if p not in self.reservations.failed]
        return not (self.options.use_relays and untried)

    def _link_changed(self, peer_id: str) -> None:
        for listener in self.link_listeners:
            try:
                listener(peer_id)
            except Exception:  # noqa: BLE001 - one listener's failure does not stop the others
                logger.exception("link listener failed")

    def poke(self) -> None:
        """Run the next check now (a new peer connected, a relay was announced)."""
        self.changed.set()

    async def _connect_explicit_relays(self) -> None:
        for address in self.options.relays:
            try:
                self._explicit_relays.append(await self._connect(address))
            except PeerUnavailableError as e:
                logger.warning("relay %s given with --relay is unreachable: %s", address, e)

    async def step(self) -> None:
        """One round: ask for dial-backs, then hold or drop relay slots and switch the relay service."""
        direct_peers = [str(p) for p in self.host.get_network().connections
                        if connection_kind(self.host, str(p)) == "direct"]
        ask = self.probe.peers_to_ask(direct_peers) if self.options.autonat else []
        if ask:
            async with trio.open_nursery() as nursery:
                for peer in ask:
                    nursery.start_soon(self.probe.ask, peer)
        public = self.status == "public"
        self.addresses.set_confirmed(self.probe.confirmed_addrs() if public else [])
        if public or not self.options.use_relays:
            if self.reservations.release_all():
                logger.info("dropping relay slots: this peer is reachable directly")
        else:
            await self.reservations.maintain(self._relay_candidates())
        self.addresses.set_circuits(self.reservations.circuits() if not public else [])
        if self.options.relay_service is None:
            self._enable_hop() if public else self.relay.disable_hop()

    def _enable_hop(self) -> None:
        if relay_service.internals_supported():
            self.relay.enable_hop()
        else:
            logger.warning("py-libp2p's relay has changed; this peer does not relay for others")

    def _relay_candidates(self) -> list[str]:
        if self._explicit_relays or self.options.relays:
            return list(self._explicit_relays)
        me = str(self.host.get_id())
        speaking: list[str] = []
        for peer in self.host.get_network().connections:
            try:
                if HOP_PROTOCOL in self.host.get_peerstore().get_protocols(peer):
                    speaking.append(str(peer))
            except Exception:  # noqa: BLE001 - no identify yet
                continue
        ordered = [*self.known_relays, *speaking, *self.initial_peers]
        return [p for p in dict.fromkeys(ordered) if p != me and connection_kind(self.host, p) != "relayed"]

    def add_known_relays(self, peer_ids: list[str]) -> None:
        """Peers announced (in their records) as relaying for others."""
        fresh = [p for p in peer_ids if p not in self.known_relays]
        if fresh:
            self.known_relays.extend(fresh)
            if self.status not in ("public", "local") and len(self.reservations.held) < self.options.max_relays:
                self.poke()

    def summary(self) -> dict[str, Any]:
        """For status displays."""
        return {"status": self.status, "relaying": self.relaying, "relays": sorted(self.reservations.held),
                "verdicts": {p: v.dialable for p, v in self.probe.verdicts.items()},
                "relay_stats": dict(self.relay.stats)}

