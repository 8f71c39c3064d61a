"""Secret files (identity keys, swarm keys): written atomically with mode 0600, refused when others can read them."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from jupyter_swarm.errors import ConfigurationError


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that no other user can ever read it and no reader ever sees half a file.

    The bytes go to a temporary file created 0600 in the same folder, are flushed to disk, and the file is then
    renamed over ``path`` (an atomic step on POSIX), so a crash leaves either the old file or the new one.
    ``exclusive``: link instead of rename, raising FileExistsError if ``path`` exists (two processes creating
    the same file at once: exactly one wins, and the other can read the winner's file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that other users may read or write (as ssh does with private keys)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"{what} file {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
                                 f"run `chmod 600 {path}` so that only you can read it")
