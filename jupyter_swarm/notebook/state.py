"""What a kernel's swarm shows the Jupyter server: a small JSON state file per kernel, plus requests back.

The kernel's publisher (:mod:`jupyter_swarm.notebook.publishing`) writes ``<state dir>/kernel-<pid>.json`` about
once a second while it is connected or serving, and removes it on shutdown. The server extension (top-level
``server/``) only reads those files and drops ``kernel-<pid>.request.json`` files (serve start/stop) that the
kernel picks up. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STALE_AFTER = 15.0  # seconds without a refresh after which a state file is ignored


def state_dir() -> Path:
    """Where state files live: ``$JUPYTER_SWARM_STATE_DIR`` or ``<jupyter runtime dir>/jupyter-swarm``."""
    explicit = os.environ.get("JUPYTER_SWARM_STATE_DIR")
    if explicit:
        return Path(explicit)
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / "jupyter-swarm"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def write_state(state: dict[str, Any], pid: int | None = None) -> Path:
    pid = pid or os.getpid()
    path = state_dir() / f"kernel-{pid}.json"
    _write_json(path, {**state, "pid": pid, "updated": time.time()})
    return path


def remove_state(pid: int | None = None) -> None:
    pid = pid or os.getpid()
    for name in (f"kernel-{pid}.json", f"kernel-{pid}.request.json"):
        try:
            (state_dir() / name).unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_states() -> list[dict[str, Any]]:
    """Every live kernel's state (ordered by process id)."""
    directory = state_dir()
    states = []
    if not directory.is_dir():
        return states
    now = time.time()
    for path in directory.glob("kernel-*.json"):
        if path.name.endswith(".request.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("pid")
        if not isinstance(pid, int) or not _alive(pid) or now - float(data.get("updated", 0)) > STALE_AFTER:
            continue
        states.append(data)
    return sorted(states, key=lambda s: s["pid"])  # a stable order: panels do not flip between kernels


def post_request(pid: int, action: str, **params: Any) -> None:
    """Ask kernel ``pid`` to do ``action`` ("serve" or "stop") the next time it refreshes its state."""
    _write_json(state_dir() / f"kernel-{pid}.request.json", {"action": action, "params": params, "time": time.time()})


def take_request(pid: int | None = None) -> dict[str, Any] | None:
    """The pending request for this kernel, removed from disk (None when there is none)."""
    path = state_dir() / f"kernel-{pid or os.getpid()}.request.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return data
