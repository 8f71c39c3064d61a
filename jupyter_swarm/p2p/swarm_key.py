"""Private swarms: a 32-byte secret that every peer of the swarm holds, kept in a small key file.

A key file looks like this (go-libp2p's ``swarm.key`` layout, under our own header, since the key is used
differently; see :mod:`jupyter_swarm.p2p.security`)::

    /jupyter-swarm/swarm-key/1.0.0/
    /base16/
    3f5c...(64 hex digits)

``jupyter-swarm keygen FILE`` writes one (mode 0600). Every command takes ``--swarm-key FILE``; without the
option the environment variable ``JUPYTER_SWARM_KEY`` (a key file path) applies; without either, the swarm is
open. The key itself never leaves the machine: peers prove they hold it inside the Noise handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.p2p.private_files import check_private, write_private

ENV_VAR = "JUPYTER_SWARM_KEY"
HEADER = "/jupyter-swarm/swarm-key/1.0.0/"
ENCODING = "/base16/"
KEY_BYTES = 32


@dataclass(frozen=True)
class SwarmKey:
    """The secret of one private swarm."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigurationError(f"a swarm key is {KEY_BYTES} bytes, got {len(self.secret)}")

    def derive(self, purpose: str) -> bytes:
        """A 32-byte value bound to this key and ``purpose`` (the key itself is never used directly)."""
        return hmac.new(self.secret, f"jupyter-swarm/{purpose}/v1".encode(), hashlib.sha256).digest()

    @property
    def noise_prologue(self) -> bytes:
        """What both ends of every connection mix into their Noise handshake (see p2p/security.py)."""
        return self.derive("noise-prologue")

    @property
    def fingerprint(self) -> str:
        """A short public name of the key, safe to print and log, to tell two swarms' keys apart."""
        return self.derive("fingerprint")[:6].hex()

    def to_text(self) -> str:
        return f"{HEADER}\n{ENCODING}\n{self.secret.hex()}\n"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"SwarmKey(fingerprint={self.fingerprint})"


def generate_swarm_key() -> SwarmKey:
    """A fresh random swarm key."""
    return SwarmKey(secrets.token_bytes(KEY_BYTES))


def write_swarm_key(path: str | os.PathLike[str], key: SwarmKey | None = None, *, overwrite: bool = False) -> SwarmKey:
    """Write ``key`` (a new one by default) to ``path``, mode 0600, atomically; refuses to replace a key file
    unless ``overwrite`` (replacing it would lock this machine out of its swarm)."""
    key = key or generate_swarm_key()
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise ConfigurationError(f"{path} already exists; a new key would lock this machine out of its swarm. "
                                 "Pick another file name, or delete the old key first")
    write_private(path, key.to_text().encode())
    return key


def load_swarm_key(path: str | os.PathLike[str]) -> SwarmKey:
    """Read a key file written by :func:`write_swarm_key` (``jupyter-swarm keygen``)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"swarm key file {path} does not exist; create one with "
                                 f"`jupyter-swarm keygen {path}` and copy it to every peer of the swarm") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read swarm key file {path}: {e}") from None
    check_private(path, "swarm key")
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != HEADER or lines[1] != ENCODING:
        raise ConfigurationError(f"{path} is not a jupyter-swarm key file: expected the three lines {HEADER!r}, "
                                 f"{ENCODING!r} and 64 hex digits (as `jupyter-swarm keygen` writes)")
    try:
        secret = bytes.fromhex(lines[2])
    except ValueError:
        raise ConfigurationError(f"the key in {path} is not hexadecimal") from None
    if len(secret) != KEY_BYTES:
        raise ConfigurationError(f"the key in {path} has {len(secret)} bytes; a swarm key has {KEY_BYTES}")
    return SwarmKey(secret)


def resolve_swarm_key(path: str | os.PathLike[str] | SwarmKey | None) -> SwarmKey | None:
    """The swarm key a command uses: ``path`` if given, else the file named by ``$JUPYTER_SWARM_KEY``, else
    None (an open swarm)."""
    if isinstance(path, SwarmKey):
        return path
    if path is None or str(path) == "":
        path = os.environ.get(ENV_VAR) or None
    return None if path is None else load_swarm_key(path)
