"""The circuit relay v2 service (the "hop" role) that public peers run for peers behind NAT, with limits.

py-libp2p 0.8.1's ``CircuitV2Protocol`` does the protocol; :class:`RelayService` keeps it and changes four things
that do not hold up in a swarm (each has a test in tests/unit/test_relay.py):

* A reservation is made for the peer on the other end of the connection. py-libp2p takes the peer id from the
  request's optional ``peer`` field, so one peer could reserve slots (and receive circuits) for any id.
* Ending one circuit ends only that circuit. py-libp2p files circuits by peer id, so when one of two circuits to the
  same server ended (a client's and another server's push), it closed the other one too.
* One message per hop stream, read with a timeout; a peer may make ``reservations_per_minute`` reservation
  requests and hold ``max_circuits_per_peer`` circuits as the source (py-libp2p limits only the destination).
* Hop can be switched on and off while running (a server turns it on once AutoNAT says it is public).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.constants import MAX_READ_LEN

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
MAX_PENDING_REQUESTS_PER_PEER = 8
_EXPECTED = ("_handle_reserve", "_handle_connect", "_relay_data", "_handle_hop_stream")


@dataclass(frozen=True)
class RelayServiceLimits:
    """What a relay gives each peer (the CLI's ``--relay-*`` options)."""

    max_reservations: int = 128  # peers holding a slot at once
    reservation_ttl: int = 900  # seconds; clients refresh before it lapses
    max_circuits_per_peer: int = 16  # open circuits to one reserved peer, and from one peer
    max_circuit_bytes: int = 1 << 30  # both directions together; 0: no limit
    max_circuit_seconds: int = 3600  # 0: no limit
    reservations_per_minute: int = 12  # reservation requests one peer may make per minute

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(duration=self.max_circuit_seconds, data=self.max_circuit_bytes,
                           max_circuit_conns=self.max_circuits_per_peer, max_reservations=self.max_reservations,
                           reservation_ttl=self.reservation_ttl)


def internals_supported() -> bool:
    """True when py-libp2p's relay has the internals :class:`RelayService` builds on."""
    return all(hasattr(CircuitV2Protocol, name) for name in _EXPECTED)


class RelayService(CircuitV2Protocol):
    """Circuit relay v2: always the "stop" role (accepting circuits to this peer); "hop" (relaying for others)
    while :meth:`enable_hop` is in effect."""

    def __init__(self, host: Any, limits: RelayServiceLimits | None = None):
        self.service_limits = limits or RelayServiceLimits()
        super().__init__(host, limits=self.service_limits.to_libp2p(), allow_hop=False)
        self.hop_enabled = False
        self._reserve_times: dict[Any, deque[float]] = {}
        self._circuits_from: dict[Any, int] = {}
        self._pending: dict[Any, int] = {}
        self.stats = {"reservations": 0, "reservations_refused": 0, "circuits": 0, "circuits_refused": 0}

    # ---- switching hop on and off ---------------------------------------------------------------------
    def enable_hop(self) -> None:
        if not self.hop_enabled:
            self.host.set_stream_handler(HOP_PROTOCOL, self._handle_hop_stream)
            self.hop_enabled = True
            logger.info("relaying for peers behind NAT (circuit relay v2 hop)")

    def disable_hop(self) -> None:
        if self.hop_enabled:
            self.host.remove_stream_handler(HOP_PROTOCOL)
            self.hop_enabled = False

    @property
    def active_circuits(self) -> int:
        return sum(self._circuits_from.values())

    # ---- requests ----------------------------------------------------------------------------------------
    async def _handle_hop_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if self._pending.get(peer, 0) >= MAX_PENDING_REQUESTS_PER_PEER:
            await _reset(stream)
            return
        self._pending[peer] = self._pending.get(peer, 0) + 1
        try:
            await self._serve_request(stream, peer)
        except Exception as e:  # noqa: BLE001 - one bad request never takes the relay down
            logger.debug("relay request from %s failed: %r", peer, e)
            await _reset(stream)
        finally:
            self._pending[peer] -= 1
            if not self._pending[peer]:
                del self._pending[peer]

    async def _serve_request(self, stream: Any, peer: Any) -> None:
        if _over_a_relay(stream):  # the spec: no reservations or circuits over a circuit
            await self._refuse(stream, StatusCode.PERMISSION_DENIED)
            return
        with trio.fail_after(REQUEST_TIMEOUT):
            message = await read_delimited_msg(stream, HopMessage)
        if message.type == HopMessage.RESERVE:
            if not self._may_reserve(peer):
                self.stats["reservations_refused"] += 1
                await self._refuse(stream, StatusCode.RESERVATION_REFUSED)
                return
            before = self.resource_manager.get_reservation(peer)
            # The reservation is for the connection's peer: a request without the optional peer field makes
            # py-libp2p fall back to exactly that.
            await self._handle_reserve(stream, HopMessage(type=HopMessage.RESERVE))
            if self.resource_manager.get_reservation(peer) is not None:
                self.stats["reservations"] += before is None
            else:
                self.stats["reservations_refused"] += 1
            await stream.close()
        elif message.type == HopMessage.CONNECT:
            target = self.resource_manager.get_reservation(ID(message.peer.id)) if message.peer.id else None
            # py-libp2p answers NO_RESERVATION for a reserved peer that is at its circuit limit too
            if (self._circuits_from.get(peer, 0) >= self.service_limits.max_circuits_per_peer
                    or (target is not None and not target.can_accept_connection())):
                self.stats["circuits_refused"] += 1
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
                return
            self._circuits_from[peer] = self._circuits_from.get(peer, 0) + 1
            try:
                self.stats["circuits"] += 1
                await self._handle_connect(stream, message)  # returns when the circuit ends
            finally:
                self._circuits_from[peer] -= 1
                if not self._circuits_from[peer]:
                    del self._circuits_from[peer]
        else:
            await self._refuse(stream, StatusCode.UNEXPECTED_MESSAGE)

    def _may_reserve(self, peer: Any) -> bool:
        now = time.monotonic()
        times = self._reserve_times.setdefault(peer, deque())
        while times and now - times[0] > 60.0:
            times.popleft()
        if len(times) >= self.service_limits.reservations_per_minute:
            return False
        times.append(now)
        if len(self._reserve_times) > 4 * self.service_limits.max_reservations + 1024:
            for p in [p for p, t in self._reserve_times.items() if not t or now - t[-1] > 60.0]:
                del self._reserve_times[p]
        return True

    async def _refuse(self, stream: Any, code: StatusCode) -> None:
        with trio.move_on_after(2):
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(code)))
                await stream.close()
                return
            except Exception:  # noqa: BLE001 - the requester may be gone
                pass
        await _reset(stream)

    # ---- one circuit's bytes ------------------------------------------------------------------------------
    async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: Any, deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        """Copy one direction of one circuit; when it ends for any reason (end of stream, a limit, an error),
        reset both streams of this circuit, which ends the other direction too, and nothing else."""
        try:
            while True:
                wait = float("inf") if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    logger.info("circuit with %s reached its duration limit", peer_id)
                    return
                data = b""
                with trio.move_on_after(wait):
                    data = await src_stream.read(MAX_READ_LEN)
                if not data:
                    return
                if circuit_data_limit is not None:
                    if len(data) > circuit_data_limit[0]:
                        logger.info("circuit with %s reached its data limit", peer_id)
                        return
                    circuit_data_limit[0] -= len(data)
                await dst_stream.write(data)
        except Exception as e:  # noqa: BLE001 - a reset or closed stream ends the circuit
            logger.debug("circuit with %s ended: %r", peer_id, e)
        finally:
            with trio.CancelScope(shield=True):
                await _reset(src_stream)
                await _reset(dst_stream)


def _over_a_relay(stream: Any) -> bool:
    try:
        return any("/p2p-circuit" in str(a) for a in stream.muxed_conn.get_transport_addresses() or [])
    except Exception:  # noqa: BLE001
        return False


async def _reset(stream: Any) -> None:
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001 - already gone
            pass
