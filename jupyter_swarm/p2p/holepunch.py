"""Hole punching (DCUtR): turning a relayed connection between two peers behind NAT into a direct one.

py-libp2p 0.8.1's ``DCUtRProtocol`` does the exchange (addresses over the relayed connection, then simultaneous TCP
dials from the listen port). :class:`HolePuncher` keeps it and changes three things:

* Only the peer that accepted the relayed connection starts the exchange (as the DCUtR spec says). py-libp2p drives
  it from both ends every 2 s, and two exchanges at once can cross their dials.
* After a direct connection is made, the relayed one is closed only once no stream uses it. py-libp2p closes it after
  60 s whatever runs on it, which cut inference sessions that started on the relay (their streams stay on the
  connection they were opened on; new streams use the direct one, which libp2p prefers).
* It remembers which peers it reached by hole punching, for the swarm map and status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol

from jupyter_swarm.p2p.addresses import dialable, is_circuit, is_loopback

logger = logging.getLogger(__name__)

DRIVE_PERIOD = 0.5
IDLE_CHECK_PERIOD = 5.0
RELAY_CLOSE_GRACE = 10.0
MAX_RELAY_LINGER = 3600.0
PROTECT_TAG = "jupyter-swarm-relayed"
UNILATERAL_TIMEOUT = 2.0
_EXPECTED = ("_perform_hole_punch", "_try_unilateral_upgrade", "_dial_peer", "_close_relayed_conns_after_grace", "_auto_drive_loop",
             "initiate_hole_punch", "_verify_direct_connection")


def internals_supported() -> bool:
    """True when py-libp2p's DCUtR has the internals :class:`HolePuncher` builds on."""
    return all(hasattr(DCUtRProtocol, name) for name in _EXPECTED)


def is_relayed(conn: Any) -> bool:
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses() or [])
    except Exception:  # noqa: BLE001
        return False


def is_inbound(conn: Any) -> bool:
    direction = getattr(conn, "direction", None)
    return getattr(direction, "name", str(direction)).lower() == "inbound"


class HolePuncher(DCUtRProtocol):
    """DCUtR with the changes in the module docstring."""

    def __init__(self, host: Any, dial_timeout: int = 5, *, known_to_fail: Callable[[str], bool] = lambda a: False):
        super().__init__(host, dial_timeout=dial_timeout)
        self.known_to_fail = known_to_fail  # addresses our dialer just failed to reach (p2p/dialing.py)
        self.on_punched: Callable[[str], None] = lambda peer: None  # a relayed peer became direct
        self.punched: set[str] = set()  # peers now reached directly thanks to a hole punch
        self.failed: set[str] = set()  # peers whose hole punches all failed (they stay relayed)
        self._driving: set[ID] = set()

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        """A plain direct dial first (the spec's step 0), to addresses not just known to fail, within
        UNILATERAL_TIMEOUT: py-libp2p tries every address for up to ``dial_timeout``, which delayed each hole punch
        by its full length when the peer announced private addresses only."""
        try:
            addrs = [a for a in self.host.get_peerstore().addrs(peer_id)
                     if not is_circuit(a) and dialable(a) and not is_loopback(a) and not self.known_to_fail(str(a))]
        except Exception:  # noqa: BLE001 - unknown peer
            return False
        if addrs:
            with trio.move_on_after(UNILATERAL_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for addr in addrs:
                        nursery.start_soon(self._dial_peer, peer_id, addr)
        return await self._verify_direct_connection(peer_id)

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[Any], as_responder: bool = False) -> bool:
        # The swarm keeps one connection per peer and trims extra ones older than its grace period, which would
        # close the relayed connection (and the sessions on it) as the direct one arrives: protect it until
        # _close_relayed_conns_after_grace closes it once idle.
        network = self.host.get_network()
        network.protect(peer_id, PROTECT_TAG)
        succeeded = await super()._perform_hole_punch(peer_id, addrs, as_responder=as_responder)
        if not succeeded:
            network.unprotect(peer_id, PROTECT_TAG)
        if succeeded:
            self.punched.add(str(peer_id))
            self.failed.discard(str(peer_id))
            self.on_punched(str(peer_id))
        elif self._hole_punch_attempts.get(peer_id, 0) >= MAX_HOLE_PUNCH_ATTEMPTS:
            self.failed.add(str(peer_id))
        return succeeded

    async def _auto_drive_loop(self) -> None:
        while True:
            await trio.sleep(DRIVE_PERIOD)
            try:
                for peer_id, conns in list(self.host.get_network().connections.items()):
                    if (peer_id in self._in_progress or peer_id in self._direct_connections
                            or self._hole_punch_attempts.get(peer_id, 0) >= MAX_HOLE_PUNCH_ATTEMPTS):
                        continue
                    conns = conns if isinstance(conns, list) else [conns]
                    if any(not is_relayed(c) for c in conns):
                        continue  # already direct
                    if peer_id in self._driving:
                        continue
                    if any(is_relayed(c) and is_inbound(c) for c in conns):
                        self._driving.add(peer_id)
                        self._nursery.start_soon(self._drive, peer_id)  # type: ignore[union-attr]
            except trio.Cancelled:
                raise
            except Exception as e:  # noqa: BLE001 - retried next period
                logger.debug("hole punch driver: %r", e)

    async def _drive(self, peer_id: ID) -> None:
        try:
            await self.initiate_hole_punch(peer_id)
        finally:
            self._driving.discard(peer_id)

    async def _close_relayed_conns_after_grace(self, peer_id: ID, grace: float = RELAY_CLOSE_GRACE) -> None:
        try:
            await self._close_relayed_when_idle(peer_id)
        finally:
            self.host.get_network().unprotect(peer_id, PROTECT_TAG)

    async def _close_relayed_when_idle(self, peer_id: ID) -> None:
        await trio.sleep(RELAY_CLOSE_GRACE)
        waited = RELAY_CLOSE_GRACE
        while waited < MAX_RELAY_LINGER:
            if not await self._verify_direct_connection(peer_id):
                return  # never strand a peer: keep the relay while there is no direct path
            conns = self.host.get_network().connections.get(peer_id, [])
            relayed = [c for c in (conns if isinstance(conns, list) else [conns]) if is_relayed(c)]
            busy = False
            for conn in relayed:
                if conn.get_streams():
                    busy = True
                else:
                    logger.info("closing the relayed connection to %s (it is reached directly now)", peer_id)
                    try:
                        await conn.close()
                    except Exception:  # noqa: BLE001
                        pass
            if not busy:
                return
            await trio.sleep(IDLE_CHECK_PERIOD)
            waited += IDLE_CHECK_PERIOD
