"""One libp2p host per process, running on trio in a background thread.

Synchronous code (and a Jupyter kernel's asyncio code) reaches the host through :meth:`P2PNode.call`,
which crosses into the trio thread with ``trio.from_thread`` (one wake-up each way; the thread itself is
started and stopped by an anyio blocking portal). Handlers and background tasks run
on that trio thread; they must not run long computations there (see ``trio.to_thread``): only a decode step
short enough that handing it to a thread would cost more runs inline (``runtime/service.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import anyio
import multiaddr
import trio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from jupyter_swarm.errors import ConfigurationError, PeerUnavailableError
from jupyter_swarm.p2p.addresses import AnnouncedAddresses, all_loopback
from jupyter_swarm.p2p.framing import DEFAULT_MAX_FRAME_BYTES, FramedStream
from jupyter_swarm.p2p.hot_path import patch_hot_path
from jupyter_swarm.p2p.inbound_cap import cap_live_inbound
from jupyter_swarm.p2p.peerstore_guard import keep_own_entry
from jupyter_swarm.p2p.peer_limits import PeerByteRate, StreamCounter, StreamQuota
from jupyter_swarm.p2p.identity import new_identity
from jupyter_swarm.p2p.reachability import NetworkOptions, Reachability
from jupyter_swarm.p2p.security import SwarmSecurity, security_options
from jupyter_swarm.p2p.swarm_key import SwarmKey
from jupyter_swarm.p2p.yamux_tuning import tune_yamux

logger = logging.getLogger(__name__)
T = TypeVar("T")
StreamHandler = Callable[[FramedStream], Awaitable[None]]

CONNECT_TIMEOUT = 5.0
JOIN_ATTEMPTS = 3
DIAL_TIMEOUT = 15.0  # finding a path to a peer: direct addresses, then its relays
DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
_PEER_ADDR_TTL = 3600


def _is_cancellation(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup(trio.Cancelled) is not None
    return isinstance(error, trio.Cancelled)


def quiet_libp2p_logs() -> None:
    """py-libp2p logs ordinary disconnects at ERROR; keep that noise away from users unless asked for
    (``JUPYTER_SWARM_DEBUG_P2P=1``, which also lets its records reach the process's log handlers: py-libp2p's own
    logging set-up stops them unless ``LIBP2P_DEBUG`` is set)."""
    if not os.environ.get("JUPYTER_SWARM_DEBUG_P2P"):
        for name in ("libp2p", "multiaddr", "async_service"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    else:
        logging.getLogger("libp2p").propagate = True


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    """Parse a multiaddr, raising ConfigurationError with the offending text on failure."""
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:  # multiaddr raises several unrelated types
        raise ConfigurationError(
            f"peer address {text!r} does not parse as a multiaddr ({e}); expected e.g. "
            "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooW...") from e


def _peer_went_away(error: Exception) -> bool:
    """True when ``error`` (or every error of a group, from a handler's nursery) says the other side went away:
    nothing to answer and nothing to log."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(PeerUnavailableError)[1] is None
    return isinstance(error, PeerUnavailableError)


def parse_peer_multiaddr(text: str) -> tuple[str, multiaddr.Multiaddr]:
    """Parse a full peer address (ending in /p2p/<peer id>) into (peer id, address)."""
    addr = parse_multiaddr(text)
    try:
        info = info_from_p2p_addr(addr)
    except Exception as e:
        raise ConfigurationError(
            f"peer address {text!r} has no /p2p/<peer id> part ({e}); copy the full address a server prints") from e
    return str(info.peer_id), addr


class _PendingDial:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: PeerUnavailableError | None = None


class P2PNode:
    """A libp2p host (TCP, Noise, yamux) with a Kademlia DHT, owned by a background trio thread.

    Unless it listens on loopback only, it also makes itself reachable (AutoNAT, relays, hole punching:
    p2p/reachability.py) as ``network`` says.
    """

    def __init__(
        self,
        *,
        identity: KeyPair | None = None,
        listen: Sequence[str] = DEFAULT_LISTEN,
        announce: Sequence[str] = (),
        dht_server: bool = True,
        swarm_key: SwarmKey | None = None,
        allowed_peers: Collection[str] | None = None,
        network: NetworkOptions | None = None,
        byte_rate: PeerByteRate | None = None,
    ):
        """``swarm_key``: connect only to peers holding it (a private swarm); ``allowed_peers``: connect only to
        these peer ids (see p2p/security.py); ``network``: reachability (relays, relay service, hole punching);
        ``byte_rate``: how fast each peer may send us frames on the streams it opens (see p2p/peer_limits.py)."""
        self.identity = identity or new_identity()
        self.swarm_key = swarm_key
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.security: SwarmSecurity | None = None
        self._listen = [parse_multiaddr(a) for a in listen]
        self._announce = [parse_multiaddr(a) for a in announce]
        self.network_options = network or NetworkOptions()
        self.addresses = AnnouncedAddresses(static=self._announce)
        self.reach: Reachability | None = None
        self._dials: dict[str, _PendingDial] = {}
        self._dht_mode = DHTMode.SERVER if dht_server else DHTMode.CLIENT
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopped: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[str, tuple[StreamHandler, StreamQuota | None]] = {}
        self.streams = StreamCounter()
        self.byte_rate = byte_rate
        self.host: Any = None
        self.dht: KadDHT | None = None
        self._lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "P2PNode":
        """Start the trio thread and the host; returns once it is listening."""
        quiet_libp2p_logs()
        tune_yamux()
        patch_hot_path()
        self._portal_cm = start_blocking_portal(backend="trio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._portal.start_task(self._run, name="libp2p-host")
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            self._portal = None
            raise
        return self

    async def _run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        self._stopped = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        sec_opt, self.security = security_options(self.identity, self.swarm_key, self.allowed_peers)
        self.host = new_host(
            key_pair=self.identity,
            sec_opt=sec_opt,
            listen_addrs=self._listen,
            # One connection per peer makes a dial return at once (more wait 250 ms for a second one). The swarm's
            # auto-connector, which dials random known peers to keep 50 connections, is off: peers connect to
            # whom they use, and behind NAT most known addresses cannot be dialed anyway.
            connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0,
                                               auto_connect_interval=1e9),
            addrs_factory=self.addresses,  # never 0.0.0.0: interfaces, confirmed public addresses, circuits
        )
        cap_live_inbound(self.host.get_network())  # else the host stops taking connections after 300 in its life
        keep_own_entry(self.host.get_peerstore(), self.host.get_id())  # else it evicts itself after 1,000 peers
        try:
            # Host contexts are entered outside any timeout scope (a py-libp2p quirk).
            async with self.host.run(listen_addrs=self._listen):
                self.addresses.attach(self.host.get_transport_addrs)
                local = self.network_options.local
                if local is None:
                    local = all_loopback(str(a) for a in self._listen)
                self.reach = Reachability(self.host, self.network_options, self.addresses, local=local,
                                          connect=self.connect)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._keep_dht_running)
                    for protocol, (handler, quota) in self._handlers.items():
                        self._install_handler(protocol, handler, quota)
                    await nursery.start(self.reach.run)
                    task_status.started()
                    await self._stopped.wait()
                    nursery.cancel_scope.cancel()
        except Exception:
            logger.exception("the libp2p node stopped on an error; this process can no longer reach peers")
            raise

    async def _keep_dht_running(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run py-libp2p's Kademlia service, and start a new one if it fails: its failure would otherwise cancel
        the whole node (a client in a 1,000-kill soak lost every connection that way, mid-generation)."""
        started = False
        while True:
            self.dht = KadDHT(self.host, self._dht_mode)
            try:
                async with background_trio_service(self.dht):
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep_forever()
            except Exception:
                logger.exception("the Kademlia DHT service failed; starting a new one")
                if not started:
                    raise
            await trio.sleep(1.0)

    def shutdown(self) -> None:
        """Stop every background task, close connections and the trio thread. Idempotent."""
        with self._lock:
            portal, self._portal = self._portal, None
            self._token = None
        if portal is None:
            return
        try:
            portal.call(self._stopped.set)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the loop may already be gone
            pass
        try:
            self._portal_cm.__exit__(None, None, None)
        except Exception as e:  # noqa: BLE001
            logger.debug("libp2p shutdown: %r", e)

    def __enter__(self) -> "P2PNode":
        return self.start() if self._portal is None else self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def running(self) -> bool:
        return self._portal is not None

    # ---- the bridge from other threads ----------------------------------------------------------
    # trio.from_thread costs one wake-up of each thread per call; an anyio portal call costs two round trips
    # (it first asks the loop to start a task, then waits for it), which is most of a decode step's bridge time.
    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the trio thread and return its result (blocking the caller)."""
        return self._cross(trio.from_thread.run, fn, *args)

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the trio thread (to touch state owned by it)."""
        return self._cross(trio.from_thread.run_sync, fn, *args)

    def _cross(self, bridge: Callable[..., T], fn: Callable[..., Any], *args: Any) -> T:
        try:
            return bridge(fn, *args, trio_token=self._running_token())
        except (KeyboardInterrupt, SystemExit, PeerUnavailableError):
            raise
        except BaseException as e:
            # A call still running when the host shuts down is cancelled with the loop's other tasks; its caller
            # (a widget's refresh thread, a generation) gets the ordinary "peer unavailable" error, not trio's.
            if isinstance(e, trio.RunFinishedError) or _is_cancellation(e) or self._token is None:
                raise PeerUnavailableError("the libp2p host was shut down while the call was running") from e
            raise

    def _running_token(self) -> trio.lowlevel.TrioToken:
        token = self._token
        if token is None:
            raise PeerUnavailableError("the libp2p host is not running (it was shut down or never started)")
        return token

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task in the node's nursery (call from the trio thread). A task that fails is logged:
        it must not cancel the nursery, which would stop the whole node (every later dial and stream would fail)."""
        assert self._nursery is not None, "node not started"

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                logger.exception("background task %s failed", getattr(fn, "__qualname__", fn))

        self._nursery.start_soon(guarded)

    def spawn_from_thread(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task in the node's nursery from any other thread."""
        self.call_sync(self.spawn, fn, *args)

    # ---- identity and addresses ---------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return str(ID.from_pubkey(self.identity.public_key))

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) that other peers can dial."""
        if self.host is None:
            return []
        return [f"{a}/p2p/{self.peer_id}" for a in self.addresses.announced()]

    # ---- handlers, connections and streams --------------------------------------------------------
    def set_handler(self, protocol: str, handler: StreamHandler, quota: StreamQuota | None = None) -> None:
        """Serve ``protocol``: each incoming stream is passed to ``handler`` as a FramedStream. With a ``quota``,
        a stream past it (too many open from that peer, or from everyone) is reset before the handler sees it."""
        self._handlers[protocol] = (handler, quota)
        if self.host is not None:
            self.call_sync(self._install_handler, protocol, handler, quota)

    def _install_handler(self, protocol: str, handler: StreamHandler, quota: StreamQuota | None) -> None:
        async def wrapped(raw_stream: Any) -> None:
            peer = str(raw_stream.muxed_conn.peer_id)
            if quota is not None and not self.streams.try_open(protocol, peer, quota):
                logger.debug("refusing a %s stream from %s: over its quota %s", protocol, peer, quota)
                await FramedStream(raw_stream).reset()
                return
            throttle = None if self.byte_rate is None else partial(self.byte_rate.take, peer)
            stream = FramedStream(raw_stream, throttle=throttle)
            try:
                await handler(stream)
            except Exception as e:  # noqa: BLE001 - one stream's failure must not take the host down
                if not _peer_went_away(e):
                    logger.exception("handler for %s failed on a stream from %s", protocol, stream.remote_peer)
            finally:
                if quota is not None:
                    self.streams.closed(protocol, peer)
                await stream.close()

        self.host.set_stream_handler(TProtocol(protocol), wrapped)

    def remember_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Tell the peerstore where ``peer_id`` listens (call on the trio thread)."""
        parsed = []
        for a in addrs:
            text = str(a)
            if "/p2p-circuit" not in text:
                text = text.split("/p2p/")[0]
            elif text.endswith(f"/p2p/{peer_id}"):
                text = text[:-len(f"/p2p/{peer_id}")]
            try:
                parsed.append(multiaddr.Multiaddr(text))
            except Exception:  # noqa: BLE001 - a peer's bad address is skipped, not fatal
                logger.warning("ignoring unparsable address %r of peer %s", a, peer_id)
        if parsed:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), parsed, _PEER_ADDR_TTL)

    async def connect(self, address: str, timeout: float = DIAL_TIMEOUT) -> str:
        """Dial a full peer multiaddr; returns the peer id. Also adds the peer to the DHT routing table and to the
        relays this peer may reserve slots on."""
        peer_id, addr = parse_peer_multiaddr(address)
        info = info_from_p2p_addr(addr)
        assert self.reach is not None
        began = time.monotonic()
        self.remember_addrs(peer_id, [address])
        try:
            await self.dial(peer_id, timeout=timeout)
        except PeerUnavailableError as e:
            reason = self.security.explain_dial_failure(peer_id, began) if self.security is not None else None
            if reason is not None:
                raise PeerUnavailableError(f"could not connect to peer at {address}: {reason}") from e
            raise PeerUnavailableError(f"could not reach peer at {address}: {e}") from e
        if peer_id not in self.reach.initial_peers:
            self.reach.initial_peers.append(peer_id)
            self.reach.poke()
        if self.dht is not None:
            try:
                await self.dht.add_peer(info.peer_id, skip_server_mode_check=True)
            except Exception as e:  # noqa: BLE001 - routing table refusal is not fatal for the connection
                logger.debug("routing table did not take %s: %r", peer_id, e)
        return peer_id

    async def join(self, initial_peers: Sequence[str]) -> list[str]:
        """Connect to a swarm's initial peers (at least one must answer) and fill the DHT routing table from them;
        returns the peer ids that answered. When none answers, tries again ``JOIN_ATTEMPTS`` times in all, a second
        apart and then more: a busy bootstrap node may drop a handshake, and a new server should not exit on that."""
        joined: list[str] = []
        for attempt in range(JOIN_ATTEMPTS):
            errors = []
            for address in initial_peers:
                try:
                    joined.append(await self.connect(address))
                except PeerUnavailableError as e:
                    errors.append(str(e))
            if joined:
                break
            if attempt + 1 < JOIN_ATTEMPTS:
                logger.info("none of the initial peers answered (attempt %d of %d); trying again", attempt + 1,
                            JOIN_ATTEMPTS)
                await trio.sleep(2 ** attempt)
                assert self.reach is not None
                self.reach.dialer.forgive(initial_peers)
        if not joined:
            raise PeerUnavailableError(f"none of the initial peers answered ({JOIN_ATTEMPTS} attempts): "
                                       + "; ".join(errors))
        # In the background: records and routes work through the peers just joined, while a refresh that dials
        # peers which died recently (their addresses linger in others' tables) can take seconds.
        self.spawn(self._refresh_routing_table)
        return joined

    async def _refresh_routing_table(self) -> None:
        with trio.move_on_after(5):
            try:
                await self.dht.refresh_routing_table()  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - a background task must not take the host down
                logger.debug("refreshing the DHT routing table failed", exc_info=True)

    async def dial(self, peer_id: str, timeout: float = DIAL_TIMEOUT) -> None:
        """Make sure there is a connection to ``peer_id`` (from the addresses in the peerstore: direct ones first,
        then through relays); raises PeerUnavailableError with every address's failure.

        The dial itself runs in the node's nursery, bounded by DIAL_TIMEOUT, and concurrent callers share it: a
        caller that gives up sooner (a one-second first ping) does not cancel a connection half-way through its
        handshake, which would leave the other side holding a connection that no longer answers.
        """
        assert self.reach is not None and self._nursery is not None
        if self.reach.dialer.connected(peer_id):
            return
        pending = self._dials.get(peer_id)
        if pending is None:
            pending = self._dials[peer_id] = _PendingDial()
            self._nursery.start_soon(self._dial_in_background, peer_id, pending)
        with trio.move_on_after(timeout):
            await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        if not pending.done.is_set():
            raise PeerUnavailableError(f"could not connect to peer {peer_id} within {timeout:g} s")

    async def _dial_in_background(self, peer_id: str, pending: "_PendingDial") -> None:
        try:
            await self.reach.dialer.connect(peer_id, timeout=DIAL_TIMEOUT)  # type: ignore[union-attr]
        except PeerUnavailableError as e:
            pending.error = e
        except Exception as e:  # noqa: BLE001 - reported to every waiting caller
            pending.error = PeerUnavailableError(f"could not connect to peer {peer_id}: {e!r}")
        finally:
            self._dials.pop(peer_id, None)
            pending.done.set()

    def watch_links(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(peer_id)`` (on the trio thread) whenever the path to a peer changes, e.g. a hole punch
        made a relayed peer direct: round-trip times measured before no longer hold."""
        assert self.reach is not None
        self.reach.link_listeners.append(listener)

    def link(self, peer_id: str) -> str | None:
        """How this peer reaches ``peer_id`` now: "direct", "hole-punched", "relayed" or None (call on the trio
        thread)."""
        return self.reach.link(peer_id) if self.reach is not None else None

    async def open_stream(self, peer_id: str, protocol: str, timeout: float = CONNECT_TIMEOUT) -> FramedStream:
        """Open a stream to a peer (dialing it if needed, from addresses in the peerstore)."""
        began = time.monotonic()
        try:
            await self.dial(peer_id)
        except PeerUnavailableError as e:
            reason = self.security.explain_dial_failure(peer_id, began) if self.security is not None else None
            if reason is None:
                raise
            raise PeerUnavailableError(f"could not open {protocol} to peer {peer_id}: {reason}") from e
        try:
            with trio.fail_after(timeout):
                raw = await self.host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except (trio.TooSlowError, BaseLibp2pError, OSError, ValueError) as e:
            reason = self.security.explain_dial_failure(peer_id, began) if self.security is not None else None
            raise PeerUnavailableError(f"could not open {protocol} to peer {peer_id}: {reason or repr(e)}") from e
        return FramedStream(raw)

    async def request(self, peer_id: str, protocol: str, payload: bytes, timeout: float,
                      max_reply_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
        """Send one message on a new stream and return the one-message answer (of at most ``max_reply_bytes``)."""
        stream = await self.open_stream(peer_id, protocol)
        stream.max_frame_bytes = max_reply_bytes
        try:
            with trio.fail_after(timeout):
                await stream.send(payload)
                return await stream.recv()
        except trio.TooSlowError as e:
            raise PeerUnavailableError(f"peer {peer_id} did not answer {protocol} within {timeout:g} s") from e
        finally:
            await stream.close()

    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection (call on the trio thread)."""
        return [str(p) for p in self.host.get_network().connections.keys()]
