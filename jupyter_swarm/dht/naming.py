"""How a model is named in the swarm, so that servers and clients of the same model meet."""

from __future__ import annotations

import re
from pathlib import Path


def model_prefix(model: str) -> str:
    """Swarm prefix for a model path or hub id: its last path component, made key-safe.

    ``./checkpoints/my-llama/`` and ``org/my-llama`` both become ``my-llama``, so a local copy of a hub model
    meets servers started from the hub id. Pass an explicit prefix to keep two different models apart.
    """
    name = Path(str(model).rstrip("/")).name or str(model)
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)
