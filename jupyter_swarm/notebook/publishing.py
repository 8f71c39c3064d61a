"""Publishing what a kernel knows about its swarm for the Jupyter server (and so the Lab/Notebook panel).

About once a second the publisher writes the kernel's snapshot as a state file (:mod:`jupyter_swarm.notebook.state`)
and carries out a request the server left for it (serve, stop), so the panel can act on the kernel.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_swarm.client.status import map_summary
from jupyter_swarm.notebook import state as state_files
from jupyter_swarm.notebook.connection import SwarmConnection
from jupyter_swarm.notebook.generation import Generation
from jupyter_swarm.notebook.serving import KernelServing, gpu_available

logger = logging.getLogger(__name__)

PERIOD = 1.0


def build_snapshot(connection: SwarmConnection, generation: Generation, serving: KernelServing) -> dict[str, Any]:
    """A JSON-able picture of the swarm as this kernel knows it."""
    data: dict[str, Any] = {"kernel_id": kernel_id(), "connected": connection.connected,
                            "model": connection.model_path, "initial_peers": connection.initial_peers,
                            "local_swarm": connection.local_swarm is not None, "serve": serving.stats(),
                            "gpu": gpu_available(), "generating": generation.generating}
    if connection.last_map is not None:
        data.update(map_summary(connection.last_map))
    data["own_peer_id"] = serving.own_peer_id()
    data["links"] = connection.links()  # how this kernel reaches each server: direct, hole-punched, relayed
    if generation.last_result is not None:
        r = generation.last_result
        data["last_generation"] = {"tokens": r.tokens, "tokens_per_second": r.tokens_per_second,
                                   "route": [list(x) for x in r.route], "error": r.error}
    return data


def kernel_id() -> str | None:
    """This kernel's id (from its connection file name), so the Jupyter server can tell kernels apart."""
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
    except Exception:  # noqa: BLE001 - not in a kernel
        return None
    return name.removeprefix("kernel-")


class StatePublisher:
    """A background thread writing ``snapshot()`` every second while ``active()``, and handing requests from the
    Jupyter server to ``on_request``; it removes the state file when inactive or closed."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], active: Callable[[], bool],
                 on_request: Callable[[dict[str, Any]], None], refresh: Callable[[], None] = lambda: None):
        self.snapshot, self.active, self.on_request, self.refresh = snapshot, active, on_request, refresh
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        """Start publishing (a no-op when already running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._loop, name="jupyter-swarm-publish", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop publishing and remove this kernel's state file."""
        self._closed.set()
        state_files.remove_state()

    def _loop(self) -> None:
        while not self._closed.wait(PERIOD):
            if not self.active():
                state_files.remove_state()
                continue
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the next refresh tries again
                logger.debug("refreshing the swarm map failed", exc_info=True)
            try:
                request = state_files.take_request()
                if request:
                    self.on_request(request)
                state_files.write_state(self.snapshot())
            except Exception:  # noqa: BLE001
                logger.debug("publishing the swarm state failed", exc_info=True)
