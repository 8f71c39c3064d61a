"""Persistent Ed25519 identities: a server keeps its peer id across restarts by keeping its key file."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.p2p.private_files import check_private, write_private


def new_identity() -> KeyPair:
    """A fresh Ed25519 key pair (an ephemeral peer id, e.g. for a client)."""
    return create_new_key_pair()


def load_or_create_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Load the Ed25519 key at ``path``, creating it if it does not exist (mode 0600, written atomically, so a
    crash never leaves a truncated key and no other user can ever read it)."""
    path = Path(path).expanduser()
    if not path.exists():
        pair = create_new_key_pair()
        try:
            write_private(path, pair.private_key.to_bytes()[:32], exclusive=True)
            return pair
        except FileExistsError:
            pass  # another process created it first: use theirs
    check_private(path, "identity")
    raw = path.read_bytes()
    if len(raw) != 32:
        raise ConfigurationError(
            f"identity file {path} is not a 32-byte Ed25519 seed ({len(raw)} bytes); "
            "delete it to create a new identity, or pass another --identity path")
    private = Ed25519PrivateKey.from_bytes(raw)
    return KeyPair(private, private.get_public_key())


def peer_id_of(pair: KeyPair) -> str:
    """The base58 peer id string of a key pair."""
    return ID.from_pubkey(pair.public_key).to_base58()
