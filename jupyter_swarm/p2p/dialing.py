"""Connecting to a peer from the addresses it announced: direct ones first, then through its relays.

py-libp2p's swarm tries one address per transport and never a circuit address. :class:`Dialer` tries every direct
address at once, starts the relayed ones after a short head start (or at once when the direct ones have failed), and
keeps the first connection that works. Each attempt is bounded in time, and an address that failed is skipped for a
while that doubles with each new failure, so an announced address nobody can dial costs a bounded time and is not
retried forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID

from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.addresses import dialable, is_circuit, is_loopback
from jupyter_swarm.p2p.relay_client import dial_through_relay

logger = logging.getLogger(__name__)

DIRECT_TIMEOUT = 5.0
RELAY_HEAD_START = 0.5  # seconds direct dials run alone before relayed ones start
FIRST_BACKOFF = 30.0
MAX_BACKOFF = 3600.0


@dataclass
class _Failure:
    until: float
    strikes: int
    reason: str


class Dialer:
    """Connects to peers over the best path their addresses offer (see the module docstring)."""

    def __init__(self, host: Any, *, relaying: bool = True, direct_timeout: float = DIRECT_TIMEOUT,
                 relay_head_start: float = RELAY_HEAD_START, local_only: bool = False):
        self.host = host
        self.relaying = relaying
        self.direct_timeout = direct_timeout
        self.relay_head_start = relay_head_start
        self.local_only = local_only
        self._failures: dict[str, _Failure] = {}

    # ---- addresses that failed ------------------------------------------------------------------------
    def skipped(self, addr: str) -> str | None:
        """Why ``addr`` is not tried now (it failed recently), or None."""
        failure = self._failures.get(addr)
        if failure is None or failure.until <= time.monotonic():
            return None
        return failure.reason

    def _failed(self, addr: str, reason: str) -> None:
        old = self._failures.get(addr)
        strikes = old.strikes + 1 if old else 1
        self._failures[addr] = _Failure(time.monotonic() + min(FIRST_BACKOFF * 2 ** (strikes - 1), MAX_BACKOFF),
                                        strikes, reason)
        if len(self._failures) > 10_000:
            now = time.monotonic()
            self._failures = {a: f for a, f in self._failures.items() if f.until > now}

    def forgive(self, addrs: Sequence[str]) -> None:
        """Let ``addrs`` be dialed again at once (initial peers the user named, being retried)."""
        for addr in addrs:
            for key in (addr, addr.split("/p2p/")[0]):
                self._failures.pop(key, None)

    def _succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)

    # ---- connecting -------------------------------------------------------------------------------------------
    def connected(self, peer_id: str) -> bool:
        conns = self.host.get_network().connections.get(ID.from_base58(peer_id))
        return bool(conns) and any(not getattr(c, "is_closed", False) for c in conns)

    def plan(self, peer_id: str, addrs: Sequence[str]) -> tuple[list[str], list[str]]:
        """(direct, relayed) addresses worth trying now, in the order given, in the form they are dialed (and
        remembered as failed): direct ones without ``/p2p/<peer>``, circuits ending in it."""
        suffix = f"/p2p/{peer_id}"
        forms = []
        for a in map(str, addrs):
            if is_circuit(a):
                forms.append(a if a.endswith(suffix) else a + suffix)
            else:
                forms.append(a[:-len(suffix)] if a.endswith(suffix) else a)
        usable = [a for a in dict.fromkeys(forms) if dialable(a) and self.skipped(a) is None]
        direct = [a for a in usable if not is_circuit(a)]
        if any(not is_loopback(a) for a in direct) and not self.local_only:
            direct = [a for a in direct if not is_loopback(a)]  # another machine's 127.0.0.1 is ourselves
        relayed = [a for a in usable if is_circuit(a)] if self.relaying else []
        return direct, relayed

    async def connect(self, peer_id: str, addrs: Sequence[str] | None = None, timeout: float = 15.0) -> None:
        """Make sure there is a connection to ``peer_id``: from ``addrs`` (default: what the peerstore knows)."""
        if self.connected(peer_id):
            return
        pid = ID.from_base58(peer_id)
        if addrs is None:
            try:
                addrs = [str(a) for a in self.host.get_peerstore().addrs(pid)]
            except Exception:  # noqa: BLE001 - unknown peer
                addrs = []
        direct, relayed = self.plan(peer_id, addrs)
        if not direct and not relayed:
            suffix = f"/p2p/{peer_id}"
            tried = [str(a) + (suffix if is_circuit(a) and not str(a).endswith(suffix) else "") for a in addrs]
            reasons = [f"{a}: {self.skipped(a)}" for a in tried if self.skipped(a)]
            raise PeerUnavailableError(
                f"no address of peer {peer_id} can be dialed now"
                + (f" (recently failed: {'; '.join(reasons)[:500]})" if reasons else
                   f" (it announced {list(addrs) or 'none'})"))
        errors: list[str] = []
        succeeded = trio.Event()
        direct_over = trio.Event()
        left = {"direct": len(direct)}
        if not direct:
            direct_over.set()

        async def attempt(addr: str, relay: bool) -> bool:
            try:
                if relay:
                    await dial_through_relay(self.host, addr)
                else:
                    with trio.fail_after(self.direct_timeout):
                        await self.host.get_network().dial_addr(multiaddr.Multiaddr(addr), pid)
            except Exception as e:  # noqa: BLE001 - libp2p raises many types; all mean "not this way"
                reason = str(e) or repr(e)
                errors.append(f"{addr}: {reason}")
                self._failed(addr, reason[:200])
                return False
            finally:
                if not relay:
                    left["direct"] -= 1
                    if left["direct"] == 0:
                        direct_over.set()
            self._succeeded(addr)
            succeeded.set()
            return True

        async def through_relays() -> None:
            # One circuit at a time: two circuits to the same peer would both complete, leaving it two relayed
            # connections to choose from.
            with trio.move_on_after(self.relay_head_start):
                await direct_over.wait()
            for addr in relayed:
                if succeeded.is_set() or await attempt(addr, True):
                    break
            relays_over.set()

        relays_over = trio.Event()
        if not relayed:
            relays_over.set()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for addr in direct:
                    nursery.start_soon(attempt, addr, False)
                if relayed:
                    nursery.start_soon(through_relays)

                async def finish_when_over() -> None:
                    await direct_over.wait()
                    await relays_over.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(finish_when_over)
                await succeeded.wait()
                nursery.cancel_scope.cancel()
        if not succeeded.is_set() and not self.connected(peer_id):
            detail = "; ".join(errors)[:1500] or f"no answer within {timeout:g} s"
            raise PeerUnavailableError(f"could not connect to peer {peer_id}: {detail}")


def connection_kind(host: Any, peer_id: str) -> str | None:
    """How this peer is connected to ``peer_id`` now: "direct", "relayed", or None (not connected)."""
    conns = host.get_network().connections.get(ID.from_base58(peer_id)) or []
    live = [c for c in conns if not getattr(c, "is_closed", False)]
    if not live:
        return None
    relayed = [c for c in live if any("/p2p-circuit" in str(a) for a in (c.get_transport_addresses() or []))]
    return "relayed" if len(relayed) == len(live) else "direct"
