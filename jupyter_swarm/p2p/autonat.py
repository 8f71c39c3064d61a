"""AutoNAT: whether other peers can dial this one, confirmed by more than one of them.

Each peer answers dial-back requests (py-libp2p's ``AutoNATService``: only addresses on the requester's observed IP,
never over a relay) and asks the peers it is directly connected to. It is **public** once ``required`` peers reached
it, **private** once ``required`` peers could not and none could. A peer that reached it at a LAN address (10.x,
192.168.x, loopback...) only shows that its own network can, so that answer is no vote: a notebook next to a server
in the same home was otherwise told it is public.

py-libp2p 0.8.1's server "dials back" with ``host.connect``, which returns the connection the request came on, so
every peer was told it is public. :class:`DialBackService` dials a fresh connection instead (TCP plus the security
handshake, outside the host's connection table, so the requester's connection is left alone) and checks the peer id
at the other end. tests/unit/test_reachability.py shows the difference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.security.pnet.protector import new_protected_conn

from jupyter_swarm.p2p.addresses import interface_addrs, ip_of, is_circuit, is_lan, is_loopback, tcp_port_of

logger = logging.getLogger(__name__)

DIAL_BACK_TIMEOUT = 5.0
QUERY_TIMEOUT = 12.0
VERDICT_LIFETIME = 30 * 60.0
MAX_DIAL_BACK_ADDRS = 4
REQUESTS_PER_MINUTE = 6  # dial-back requests served per requester


class DialBackService(AutoNATService):
    """py-libp2p's AutoNAT server and client, dialing back on a fresh connection (see the module docstring)."""

    def __init__(self, host: Any, serve: bool = True):
        super().__init__(host, serve=serve)
        self._served: dict[Any, list[float]] = {}

    async def _handle_dial(self, message: Message, observed_ip: str | None, is_relayed: bool) -> Message:
        peer = ID(message.dial.peer.id) if message.dial.peer.id else None
        now = time.monotonic()
        recent = [t for t in self._served.get(peer, []) if now - t < 60.0]
        if len(recent) >= REQUESTS_PER_MINUTE:
            response = Message()
            response.type = Message.DIAL_RESPONSE
            response.dialResponse.status = Message.E_DIAL_REFUSED
            response.dialResponse.statusText = "too many dial-back requests; ask again in a minute"
            return response
        self._served[peer] = [*recent, now]
        if len(self._served) > 4096:
            self._served = {p: t for p, t in self._served.items() if t and now - t[-1] < 60.0}
        return await super()._handle_dial(message, observed_ip, is_relayed)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:MAX_DIAL_BACK_ADDRS]:
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT):
                    await fresh_handshake(self.host, peer_id, multiaddr.Multiaddr(raw))
                return bytes(raw)
            except Exception as e:  # noqa: BLE001 - any failure means "not reachable there"
                logger.debug("dial-back to %s at %s failed: %r", peer_id, multiaddr.Multiaddr(raw), e)
        return None


async def fresh_handshake(host: Any, peer_id: ID, addr: multiaddr.Multiaddr) -> None:
    """Open a new transport connection to ``addr``, complete the security handshake with ``peer_id`` (which checks
    the peer's identity), and close it; the host's own connections are not touched."""
    network = host.get_network()
    transport = network.transport_manager.transport_for_dialing(addr)
    if transport is None:
        raise ValueError(f"no transport dials {addr}")
    raw = await transport.dial(addr)
    try:
        psk = getattr(network, "psk", None)
        if psk is not None:
            raw = new_protected_conn(raw, psk)
        secured = await network.upgrader.upgrade_security(raw, True, peer_id)
        await secured.close()
    finally:
        with trio.CancelScope(shield=True):
            try:
                await raw.close()
            except Exception:  # noqa: BLE001
                pass


@dataclass
class Verdict:
    dialable: bool
    addr: str | None
    when: float


class ReachabilityProbe:
    """Asks peers to dial this peer back and tallies their verdicts (status: public / private / unknown)."""

    def __init__(self, service: DialBackService, *, required: int = 2):
        self.service = service
        self.host = service.host
        self.required = required
        self.verdicts: dict[str, Verdict] = {}
        self.asked: dict[str, float] = {}

    # ---- what to ask and whom ---------------------------------------------------------------------
    def candidate_addrs(self) -> list[multiaddr.Multiaddr]:
        """Addresses a dial-back may try: the interfaces', plus each outside IP peers observed us at with each
        listen port (a NAT that keeps ports, or a 1:1 NAT, maps the listen port there)."""
        listening = [a for a in self.host.get_transport_addrs() if not is_circuit(a)]
        # loopback last: a server only dials addresses on the IP it sees us at, so these serve only local peers
        concrete = sorted(interface_addrs(listening), key=is_loopback)
        ports = sorted({p for p in (tcp_port_of(a) for a in listening) if p})
        predicted = [multiaddr.Multiaddr(f"/ip{ip.version}/{ip}/tcp/{port}")
                     for ip in self._observed_ips() for port in ports]
        seen, out = set(), []
        for a in [*predicted, *concrete]:
            if str(a) not in seen:
                seen.add(str(a))
                out.append(a)
        return out

    def _observed_ips(self) -> list[Any]:
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return []
        try:
            observed = manager.addrs(min_observers=1)
        except Exception:  # noqa: BLE001 - py-libp2p internals; no observations then
            return []
        ips = []
        for a in observed:
            ip = ip_of(a)
            if ip is not None and not ip.is_loopback and ip not in ips:
                ips.append(ip)
        return ips

    def peers_to_ask(self, connected_direct: Iterable[str], limit: int = 3, every: float = 600.0) -> list[str]:
        now = time.monotonic()
        return [p for p in connected_direct if now - self.asked.get(p, -1e9) > every][:limit]

    # ---- asking ---------------------------------------------------------------------------------------
    async def ask(self, peer: str) -> Verdict | None:
        """One dial-back request; None when the peer gave no verdict (refused, no AutoNAT, unreachable)."""
        self.asked[peer] = time.monotonic()
        addrs = [a.to_bytes() for a in self.candidate_addrs()]
        if not addrs:
            return None
        try:
            status, addr = await self.service.query_server(ID.from_base58(peer), addrs, timeout=QUERY_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a peer without AutoNAT, or gone
            logger.debug("AutoNAT request to %s failed: %r", peer, e)
            return None
        if status == Message.OK:
            reached = str(multiaddr.Multiaddr(addr)) if addr else None
            if reached is None or is_lan(reached):
                logger.debug("AutoNAT: %s reached this peer on its own network (%s): no vote", peer, reached)
                return None
            verdict = Verdict(True, reached, time.monotonic())
        elif status == Message.E_DIAL_ERROR:
            verdict = Verdict(False, None, time.monotonic())
        else:  # refused (no address on the IP it sees us at, rate limit) or bad request: no verdict
            return None
        self.verdicts[peer] = verdict
        logger.info("AutoNAT: %s %s this peer", peer, "reached" if verdict.dialable else "could not reach")
        return verdict

    def _current(self) -> list[Verdict]:
        now = time.monotonic()
        return [v for v in self.verdicts.values() if now - v.when < VERDICT_LIFETIME]

    @property
    def status(self) -> str:
        current = self._current()
        reached = sum(v.dialable for v in current)
        failed = len(current) - reached
        if reached >= self.required and reached >= failed:
            return "public"
        if failed >= self.required and reached == 0:
            return "private"
        return "unknown"

    def confirmed_addrs(self) -> list[multiaddr.Multiaddr]:
        """Addresses at which some peer reached us (announced once the status is public)."""
        out: list[multiaddr.Multiaddr] = []
        for v in self._current():
            if v.dialable and v.addr and all(str(a) != v.addr for a in out):
                out.append(multiaddr.Multiaddr(v.addr))
        return out


__all__ = ["AUTONAT_PROTOCOL_ID", "DialBackService", "ReachabilityProbe", "fresh_handshake"]
