"""Which addresses a peer listens on and which it tells others about.

* A swarm whose initial peers are all on loopback (local swarms, the demo, tests) stays on loopback; a peer joining
  peers elsewhere listens on every interface (:func:`default_listen`).
* A wildcard listen address (``/ip4/0.0.0.0/...``) is never announced: it is replaced by the interfaces' addresses,
  plus the public addresses other peers confirmed they could dial (AutoNAT), plus circuit addresses through the
  relays this peer holds reservations on (:class:`AnnouncedAddresses`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import multiaddr
from libp2p.utils.address_validation import expand_wildcard_address

logger = logging.getLogger(__name__)

INITIAL_PEERS_ENV = "JUPYTER_SWARM_INITIAL_PEERS"
LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"
ALL_INTERFACES_LISTEN = "/ip4/0.0.0.0/tcp/0"
CIRCUIT = "/p2p-circuit"


def ip_of(addr: multiaddr.Multiaddr | str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a multiaddr starts with (None for DNS names, circuit-only or unparsable addresses)."""
    text = str(addr)
    parts = text.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        return ipaddress.ip_address(parts[2])
    except ValueError:
        return None


def tcp_port_of(addr: multiaddr.Multiaddr | str) -> int | None:
    parts = str(addr).split("/")
    if len(parts) >= 5 and parts[3] == "tcp":
        try:
            return int(parts[4])
        except ValueError:
            return None
    return None


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    """A relayed address (``<relay>/p2p-circuit/p2p/<peer>``)."""
    return CIRCUIT in str(addr)


def is_loopback(addr: multiaddr.Multiaddr | str) -> bool:
    ip = ip_of(addr)
    if ip is not None:
        return ip.is_loopback
    return str(addr).startswith(("/dns/localhost/", "/dns4/localhost/", "/dns6/localhost/"))


def is_wildcard(addr: multiaddr.Multiaddr | str) -> bool:
    ip = ip_of(addr)
    return ip is not None and ip.is_unspecified


def is_public(addr: multiaddr.Multiaddr | str) -> bool:
    """A globally routable IP address (not private, loopback, link-local or unspecified)."""
    ip = ip_of(addr)
    return ip is not None and ip.is_global


_LAN_NETWORKS = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8",
    "fc00::/7", "fe80::/10", "::1/128")]


def is_lan(addr: multiaddr.Multiaddr | str) -> bool:
    """An address that only its own network can reach: RFC 1918 and carrier-grade NAT ranges, link-local, loopback
    (documentation and other reserved ranges are not: tests use them for their "internet")."""
    ip = ip_of(addr)
    return ip is not None and any(ip in net for net in _LAN_NETWORKS if net.version == ip.version)


def dialable(addr: multiaddr.Multiaddr | str) -> bool:
    """Whether an announced address can be dialed at all: a wildcard (``0.0.0.0``) or port 0 cannot."""
    if is_circuit(addr):
        return True
    return not is_wildcard(addr) and tcp_port_of(addr) != 0


def all_loopback(peer_addresses: Iterable[str]) -> bool:
    """True when every address is on loopback (a local swarm); True for no addresses (a new local swarm)."""
    return all(is_loopback(a) and not is_circuit(a) for a in peer_addresses)


def resolve_initial_peers(given: Sequence[str] | None) -> list[str]:
    """The initial peers given, or else those in ``$JUPYTER_SWARM_INITIAL_PEERS`` (separated by spaces or commas):
    a public swarm's bootstrap addresses are configuration, not code."""
    if given:
        return list(given)
    return [a for a in os.environ.get(INITIAL_PEERS_ENV, "").replace(",", " ").split() if a]


def default_listen(initial_peers: Sequence[str]) -> list[str]:
    """Loopback for a local swarm (no initial peers, or all on loopback); every interface otherwise."""
    return [LOOPBACK_LISTEN] if all_loopback(initial_peers) else [ALL_INTERFACES_LISTEN]


def interface_addrs(listening: Iterable[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Listen addresses with wildcards replaced by the interfaces' addresses (loopback only if nothing else)."""
    concrete: list[multiaddr.Multiaddr] = []
    loopback: list[multiaddr.Multiaddr] = []
    for addr in listening:
        if is_circuit(addr):
            continue
        expanded = expand_wildcard_address(addr) if is_wildcard(addr) else [addr]
        for a in expanded:
            if is_wildcard(a):
                continue  # expansion found no interface: never announce the wildcard itself
            (loopback if is_loopback(a) and is_wildcard(addr) else concrete).append(a)
    return _unique(concrete or loopback)


def _unique(addrs: Iterable[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    seen: set[str] = set()
    out = []
    for a in addrs:
        if str(a) not in seen:
            seen.add(str(a))
            out.append(a)
    return out


class AnnouncedAddresses:
    """The addresses a host announces (its ``addrs_factory``), in the order peers should try them: addresses
    confirmed dialable from outside, then the interfaces' addresses, then circuits through relays.

    ``static`` (``--announce``) replaces the discovered direct addresses; circuits are still added.
    """

    def __init__(self, static: Sequence[multiaddr.Multiaddr] = ()):
        self.static = list(static)
        self.confirmed: list[multiaddr.Multiaddr] = []  # public addresses an AutoNAT dial-back reached
        self.circuits: list[multiaddr.Multiaddr] = []  # <relay addr>/p2p/<relay>/p2p-circuit
        self._listening: Callable[[], Sequence[multiaddr.Multiaddr]] = lambda: ()
        self.on_change: Callable[[], None] = lambda: None

    def attach(self, listening: Callable[[], Sequence[multiaddr.Multiaddr]]) -> None:
        """Where the host's actual listen addresses (ports resolved) come from."""
        self._listening = listening

    def direct(self) -> list[multiaddr.Multiaddr]:
        """Announced addresses that need no relay."""
        if self.static:
            return list(self.static)
        return _unique([*self.confirmed, *interface_addrs(self._listening())])

    def __call__(self, candidates: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """The host's ``addrs_factory`` (what identify tells peers): the direct addresses. py-libp2p's candidates
        add addresses observed by four peers (a NAT's outside address with the port of one outgoing connection:
        useless to dial); confirmed ones come from AutoNAT instead. Circuits are left out: py-libp2p's
        ``get_addrs`` cuts a circuit address at its relay's ``/p2p/`` part."""
        return self.direct()

    def announced(self) -> list[multiaddr.Multiaddr]:
        """Everything this peer announces in its records: the direct addresses, then the circuits."""
        return _unique([*self.direct(), *self.circuits])

    def set_confirmed(self, addrs: Sequence[multiaddr.Multiaddr]) -> None:
        if [str(a) for a in addrs] != [str(a) for a in self.confirmed]:
            self.confirmed = list(addrs)
            self.on_change()

    def set_circuits(self, addrs: Sequence[multiaddr.Multiaddr]) -> None:
        if [str(a) for a in addrs] != [str(a) for a in self.circuits]:
            self.circuits = list(addrs)
            self.on_change()
