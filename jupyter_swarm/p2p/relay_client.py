"""The circuit relay v2 client: slots reserved on public peers (so peers behind NAT can be reached through them)
and connections dialed through a relay.

Built on py-libp2p's relay messages (``HopMessage``: RESERVE and CONNECT). Its ``CircuitV2Transport`` is not used:
it reserves a slot on the relay before every dial (a client that only dials takes one of the relay's slots), waits
for a relay's answer without a time limit on one path, and its swarm skips circuit addresses when dialing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.addresses import CIRCUIT, is_circuit, is_public

logger = logging.getLogger(__name__)

RELAY_TIMEOUT = 10.0  # one request to a relay, its connection included


class RelayRefusedError(PeerUnavailableError):
    """A relay answered a reservation or circuit request with a refusal (its status code says why)."""

    def __init__(self, relay: str, what: str, status: int):
        try:
            name = StatusCode(status).name
        except ValueError:
            name = str(status)
        self.status = status
        hint = {
            "NO_RESERVATION": "the peer holds no reservation on that relay, so the address it announced is stale "
                              "or false",
            "RESOURCE_LIMIT_EXCEEDED": "the relay is at one of its limits; another relay or a direct path may work",
            "RESERVATION_REFUSED": "the relay refuses more reservations from this peer for now",
            "PERMISSION_DENIED": "the relay does not relay for this peer",
            "CONNECTION_FAILED": "the relay could not reach the peer",
        }.get(name, "")
        super().__init__(f"relay {relay} refused the {what}: {name}" + (f" ({hint})" if hint else ""))


def parse_circuit(addr: str | multiaddr.Multiaddr) -> tuple[str, str, str]:
    """``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`` -> (relay address without its id, relay id, peer id)."""
    text = str(addr)
    relay_part, sep, rest = text.partition(CIRCUIT)
    if not sep or not rest.startswith("/p2p/") or "/p2p/" not in relay_part:
        raise ValueError(f"{text!r} is not a circuit address (<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>)")
    relay_addr, _, relay_id = relay_part.rpartition("/p2p/")
    peer = rest[len("/p2p/"):].split("/")[0]
    ID.from_base58(relay_id)
    ID.from_base58(peer)
    return relay_addr, relay_id, peer


@dataclass
class Reservation:
    """A slot held on one relay."""

    relay: str
    expires: float  # unix time the relay gave
    circuits: list[multiaddr.Multiaddr] = field(default_factory=list)  # <relay addr>/p2p/<relay>/p2p-circuit


async def _relay_request(host: Any, relay: str, message: HopMessage) -> tuple[Any, HopMessage]:
    """Open a hop stream to ``relay``, send ``message`` and read the answer; the stream stays open."""
    stream = await host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL])
    try:
        await write_delimited_msg(stream, message)
        answer = await read_delimited_msg(stream, HopMessage)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001
                pass
        raise
    return stream, answer


async def reserve(host: Any, relay: str, timeout: float = RELAY_TIMEOUT) -> Reservation:
    """Reserve a slot on ``relay`` (already connected, or dialable from the peerstore)."""
    try:
        with trio.fail_after(timeout):
            stream, answer = await _relay_request(host, relay, HopMessage(type=HopMessage.RESERVE))
            await stream.close()
    except trio.TooSlowError as e:
        raise PeerUnavailableError(f"relay {relay} did not answer a reservation request within {timeout:g} s") from e
    except PeerUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - libp2p's many error types
        raise PeerUnavailableError(f"could not ask relay {relay} for a reservation: {e!r}") from e
    if answer.status != StatusCode.OK or not answer.HasField("reservation"):
        raise RelayRefusedError(relay, "reservation", answer.status)
    circuits = []
    for raw in answer.reservation.addrs:
        try:
            addr = multiaddr.Multiaddr(bytes(raw))
        except Exception:  # noqa: BLE001 - a bad address from the relay is skipped
            continue
        text = str(addr)
        if not text.endswith(f"/p2p/{relay}"):
            text = f"{text}/p2p/{relay}"
        circuits.append(multiaddr.Multiaddr(text + CIRCUIT))
    # Public relay addresses first: a private one works only inside the relay's own network.
    circuits.sort(key=lambda a: not is_public(a))
    return Reservation(relay, float(answer.reservation.expire), circuits)


async def dial_through_relay(host: Any, circuit: str | multiaddr.Multiaddr, timeout: float = RELAY_TIMEOUT) -> Any:
    """Connect to the peer at the end of a circuit address through its relay; returns the new connection."""
    relay_addr, relay, peer = parse_circuit(circuit)
    try:
        with trio.fail_after(timeout):
            if ID.from_base58(relay) not in host.get_network().connections:
                host.get_peerstore().add_addrs(ID.from_base58(relay), [multiaddr.Multiaddr(relay_addr)], 600)
            stream, answer = await _relay_request(
                host, relay, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=ID.from_base58(peer).to_bytes())))
            if answer.status != StatusCode.OK:
                with trio.move_on_after(1):
                    await stream.reset()
                raise RelayRefusedError(relay, f"circuit to {peer}", answer.status)
            raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                addresses=[multiaddr.Multiaddr(f"/p2p/{relay}{CIRCUIT}/p2p/{peer}")])
        # Once the relay has connected us, the handshake runs to its end (bounded on its own) even if the caller
        # gives up: cancelled half-way, the peer kept a connection that no longer answered (its hole punches over
        # it then timed out).
        with trio.CancelScope(shield=True), trio.fail_after(timeout):
            return await host.upgrade_outbound_connection(raw, ID.from_base58(peer))
    except trio.TooSlowError as e:
        raise PeerUnavailableError(f"no circuit to {peer} through relay {relay} within {timeout:g} s") from e
    except PeerUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PeerUnavailableError(f"could not reach {peer} through relay {relay}: {e!r}") from e


def circuit_addrs_of(addrs: list[str]) -> list[str]:
    return [a for a in addrs if is_circuit(a)]


class RelayReservations:
    """Keeps slots on up to ``max_relays`` relays while wanted, refreshing them before they lapse and replacing
    relays that went away; reports the circuit addresses to announce through ``on_circuits``."""

    def __init__(self, host: Any, *, max_relays: int = 2, refresh_margin: float = 0.35):
        self.host = host
        self.max_relays = max_relays
        self.refresh_margin = refresh_margin  # refresh when this fraction of the slot's lifetime is left
        self.held: dict[str, Reservation] = {}
        self.failed: dict[str, float] = {}  # relay -> monotonic time before which it is not asked again
        self._granted: dict[str, float] = {}  # relay -> monotonic time of the last grant (for the refresh)
        self.last_error: str | None = None

    def circuits(self) -> list[multiaddr.Multiaddr]:
        return [c for r in self.held.values() for c in r.circuits]

    def _connected(self, relay: str) -> bool:
        return bool(self.host.get_network().connections.get(ID.from_base58(relay)))

    async def maintain(self, candidates: list[str]) -> bool:
        """One pass: drop slots on relays we lost, refresh slots near expiry, fill up to ``max_relays`` from
        ``candidates`` (in order). Returns True when the set of circuits changed."""
        before = [str(c) for c in self.circuits()]
        now = time.time()
        for relay, r in list(self.held.items()):
            lifetime = max(r.expires - self._granted.get(relay, now), 1.0)
            if not self._connected(relay) or r.expires - now < self.refresh_margin * lifetime:
                try:
                    await self._reserve(relay)
                except PeerUnavailableError as e:
                    logger.info("lost the reservation on relay %s: %s", relay, e)
                    del self.held[relay]
        mono = time.monotonic()
        for relay in candidates:
            if len(self.held) >= self.max_relays:
                break
            if relay in self.held or self.failed.get(relay, 0) > mono:
                continue
            try:
                await self._reserve(relay)
                logger.info("reserved a slot on relay %s", relay)
            except PeerUnavailableError as e:
                self.last_error = str(e)
                self.failed[relay] = mono + 60.0
                logger.info("no reservation on relay %s: %s", relay, e)
        return [str(c) for c in self.circuits()] != before

    async def _reserve(self, relay: str) -> None:
        reservation = await reserve(self.host, relay)
        if not reservation.circuits:
            # A relay that listens on a wildcard may send no addresses: use those we reached it at.
            known = [a for a in self.host.get_peerstore().addrs(ID.from_base58(relay)) if not is_circuit(a)]
            reservation.circuits = [multiaddr.Multiaddr(f"{a}/p2p/{relay}{CIRCUIT}") for a in known]
        self.held[relay] = reservation
        self._granted[relay] = time.time()

    def release_all(self) -> bool:
        """Stop announcing circuits (the relays forget the slots when they lapse). True if any were held."""
        had = bool(self.held)
        self.held.clear()
        return had
