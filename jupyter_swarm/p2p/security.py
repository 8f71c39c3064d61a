"""Who may connect: Noise only, bound to the swarm key of a private swarm, optionally an allow-list of peer ids.

Why Noise only: py-libp2p's default host also accepts ``/plaintext/2.0.0`` (and secio), whose handshake sends a
public key without proving that the sender holds its private key, so any peer could claim any peer id; our
records and push checks rely on the peer id being authenticated.

Why the swarm key goes into the Noise prologue instead of py-libp2p's ``new_host(psk=...)`` (its "pnet"):
``libp2p/security/pnet/psk_conn.py`` (py-libp2p 0.8.1) wraps the TCP stream in plain Salsa20 keyed by the
PSK, with an 8-byte random nonce per direction (its docstring says 24; go-libp2p uses XSalsa20 with 24) and
no MAC. So (1) it authenticates nothing by itself: a keyless peer is only stopped because its bytes decrypt
to garbage that multistream-select rejects; (2) the dialer picks its nonce, so an eavesdropper can replay a
recorded nonce and then XOR chosen bytes into the positions whose plaintext is predictable (the
multistream-select header), which the unauthenticated cipher cannot notice; (3) with one key for the whole
swarm, random 64-bit nonces repeat (keystream reuse) after about 2^32 connections; (4) it reads the nonce
with one ``read(8)`` that a TCP stream may satisfy with fewer bytes (a spurious "short nonce" failure).

Instead both ends mix ``HMAC(swarm key, "noise-prologue")`` into Noise XX as the prologue. The prologue enters
the handshake hash ``h``, which is the associated data of every handshake AEAD (ChaCha20-Poly1305, with fresh
ephemeral keys per connection and counter nonces): a peer without the key cannot produce or check the tags on
the static keys and payloads of messages 2 and 3, so the handshake fails before any stream opens, in both
directions, and nothing replayed from another connection verifies. Without a swarm key the prologue is empty:
standard libp2p Noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

from libp2p.abc import IRawConnection, ISecureConn
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.patterns import PatternXX
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from jupyter_swarm.p2p.swarm_key import SwarmKey

logger = logging.getLogger(__name__)


class SwarmHandshakeFailure(HandshakeFailure):
    """The Noise handshake failed (a different or missing swarm key), or the peer is not on the allow-list."""


class SwarmSecurity(NoiseTransport):
    """libp2p's Noise XX with the swarm key as prologue and an optional allow-list of remote peer ids."""

    def __init__(self, identity: KeyPair, *, swarm_key: SwarmKey | None = None,
                 allowed_peers: Collection[str] | None = None):
        super().__init__(identity, noise_privkey=new_x25519_pair().private_key)
        self.swarm_key = swarm_key
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.refused_inbound = 0  # handshakes a remote peer started and failed or was refused (for tests and logs)
        self._outbound: dict[str, tuple[str, float]] = {}  # peer id -> (outcome of the last handshake, when)

    def get_pattern(self) -> PatternXX:
        prologue = self.swarm_key.noise_prologue if self.swarm_key is not None else None
        return PatternXX(self.local_peer, self.libp2p_privkey, self.noise_privkey, self.early_data, prologue=prologue)

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        try:
            secured = await self._handshake(super().secure_inbound(conn))
            self._admit(secured)
        except SwarmHandshakeFailure as e:
            self.refused_inbound += 1
            logger.info("refused a connection from %s: %s", _address(conn), e)
            raise
        return secured

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        try:
            secured = await self._handshake(super().secure_outbound(conn, peer_id))
        except SwarmHandshakeFailure:
            self._outbound[str(peer_id)] = ("failed", time.monotonic())
            raise
        self._outbound[str(peer_id)] = ("secured", time.monotonic())
        if len(self._outbound) > 4096:  # only recent outcomes matter (the dial in progress)
            del self._outbound[next(iter(self._outbound))]
        self._admit(secured)
        return secured

    async def _handshake(self, handshake: Any) -> ISecureConn:
        """Run a Noise handshake, turning whatever the Noise library raises on a bad tag into one failure type
        (py-libp2p lets some of them escape its connection upgrade otherwise)."""
        try:
            return await handshake
        except HandshakeFailure as e:
            raise SwarmHandshakeFailure(self._mismatch_hint(e)) from e
        except Exception as e:  # noqa: BLE001 - the noise library's decryption errors have no common base
            raise SwarmHandshakeFailure(self._mismatch_hint(e)) from e

    def _mismatch_hint(self, error: BaseException) -> str:
        private = f"this peer uses swarm key {self.swarm_key.fingerprint}" if self.swarm_key else "this swarm is open"
        return (f"the Noise handshake failed ({type(error).__name__}): the other peer is in a different private "
                f"swarm or none ({private})")

    def _admit(self, secured: ISecureConn) -> None:
        remote = str(secured.get_remote_peer())
        if self.allowed_peers is not None and remote not in self.allowed_peers:
            raise SwarmHandshakeFailure(f"peer {remote} is not on this peer's allow-list of peer ids")

    def explain_dial_failure(self, peer_id: str, since: float) -> str | None:
        """Why dialing ``peer_id`` (begun at monotonic time ``since``) failed, when this transport saw it: the
        handshake failed (swarm key), or it succeeded and the peer closed the connection at once (its allow-list)."""
        outcome = self._outbound.get(peer_id)
        if outcome is None or outcome[1] < since:
            return None
        if outcome[0] == "failed":
            here = f"swarm key {self.swarm_key.fingerprint}" if self.swarm_key else "no swarm key"
            return (f"the handshake with it failed: the two peers do not hold the same swarm key (this peer has {here}); "
                    "give every peer the same key file with --swarm-key FILE or $JUPYTER_SWARM_KEY")
        if self.allowed_peers is not None and peer_id not in self.allowed_peers:
            return "it is not on this peer's allow-list of peer ids"
        return ("it closed the connection right after the handshake: it may accept only an allow-list of peer ids; "
                "ask its operator to add this peer id (keep a stable one with an identity file)")


def security_options(identity: KeyPair, swarm_key: SwarmKey | None,
                     allowed_peers: Collection[str] | None) -> tuple[dict[TProtocol, SwarmSecurity], SwarmSecurity]:
    """``new_host(sec_opt=...)`` for this swarm (Noise only), and the transport itself."""
    transport = SwarmSecurity(identity, swarm_key=swarm_key, allowed_peers=allowed_peers)
    return {TProtocol(NOISE_PROTOCOL_ID): transport}, transport


def _address(conn: IRawConnection) -> str:
    try:
        address = conn.get_remote_address()
    except Exception:  # noqa: BLE001 - only for the log line
        address = None
    return f"{address[0]}:{address[1]}" if address else "an unknown address"
