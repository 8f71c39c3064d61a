"""Persistent Ed25519 identities: a server keeps its peer id across restarts by keeping its key file."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from jupyter_swarm.errors import ConfigurationError


def new_identity() -> KeyPair:
    """A fresh Ed25519 key pair (an ephemeral peer id, e.g. for a client)."""
    return create_new_key_pair()


def load_or_create_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Load the Ed25519 key at ``path``, creating it (mode 0600) if it does not exist."""
    path = Path(path).expanduser()
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ConfigurationError(
                f"identity file {path} is not a 32-byte Ed25519 seed ({len(raw)} bytes); "
                "delete it to create a new identity, or pass another --identity path")
        private = Ed25519PrivateKey.from_bytes(raw)
        return KeyPair(private, private.get_public_key())
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = create_new_key_pair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.private_key.to_bytes()[:32])
    return pair


def peer_id_of(pair: KeyPair) -> str:
    """The base58 peer id string of a key pair."""
    return ID.from_pubkey(pair.public_key).to_base58()
