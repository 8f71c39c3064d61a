"""Where jupyter-swarm keeps files between runs: one cache folder for every layer."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jupyter-swarm`` (``~/.cache/jupyter-swarm`` by default); not created here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jupyter-swarm"
