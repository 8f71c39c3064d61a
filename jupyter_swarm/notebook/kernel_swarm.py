"""The swarm as one kernel sees it: the object behind `%swarm`, the widgets and the Jupyter panel (``swarm``).

Four jobs, one module each: connecting (:mod:`.connection`), generating (:mod:`.generation`), serving blocks
(:mod:`.serving`) and publishing state for the Jupyter server (:mod:`.publishing`). Everything slow runs in
background threads; the kernel's exit stops served blocks, the client and any local swarm.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jupyter_swarm.notebook.connection import SwarmConnection
from jupyter_swarm.notebook.generation import Generation, GenerationResult
from jupyter_swarm.notebook.publishing import StatePublisher, build_snapshot
from jupyter_swarm.notebook.serving import KernelServing, describe_error


class KernelSwarm:
    """This kernel's swarm: ``model`` and ``tokenizer`` once connected, blocks it serves, a generation running.

    ``connection``, ``generation`` and ``serving`` hold each job's state; the methods here are what a notebook
    user calls (``swarm.serve("auto")``, ``swarm.wait_serving()``, ...), including the steps that involve more
    than one job (leaving the swarm stops generating and serving first).
    """

    def __init__(self) -> None:
        self.connection = SwarmConnection()
        self.generation = Generation(self.connection)
        self.serving = KernelServing(self.connection)
        self.publisher = StatePublisher(self.snapshot, active=self._active, on_request=self._handle_request,
                                        refresh=self._refresh_map)
        self.api: Any = None  # the OpenAI-compatible API server (jupyter_swarm.api.server.ApiServer), if started
        atexit.register(self.shutdown)

    # ---- what notebooks use -----------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The distributed model (a transformers model), or None before ``connect``."""
        return self.connection.model

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None before ``connect``."""
        return self.connection.tokenizer

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def model_path(self) -> str | None:
        return self.connection.model_path

    @property
    def initial_peers(self) -> list[str]:
        return self.connection.initial_peers

    @property
    def local_swarm(self) -> Any:
        """The LocalSwarm of server processes ``connect(..., local=True)`` started, or None."""
        return self.connection.local_swarm

    @property
    def serve_state(self) -> str:
        """idle | starting | serving | stopping | error"""
        return self.serving.state

    @property
    def serve_blocks(self) -> tuple[int, int] | None:
        return self.serving.blocks

    @property
    def serve_error(self) -> str | None:
        return self.serving.error

    def connect(self, model: str, peers: Sequence[str] = (), *, local: bool = False,
                spans: Sequence[tuple[int, int]] | None = None, progress: Callable[[str], None] = print,
                swarm_key: str | None = None, verify: float | None = None) -> Any:
        """Join a swarm (or start a local one); see :meth:`SwarmConnection.connect`. Returns the model."""
        if self.connected:
            self.disconnect()
        model_obj = self.connection.connect(model, peers, local=local, spans=spans, progress=progress,
                                            swarm_key=swarm_key, verify=verify)
        self.publisher.start()
        return model_obj

    def disconnect(self) -> None:
        """Leave the swarm: stop the API, generating and serving, close the client, stop the local swarm."""
        self.stop_api()
        self.generation.stop_generation()
        self.serving.stop_serving(wait=True)
        self.connection.disconnect()

    def generate_stream(self, prompt: str, **options: Any) -> Iterator[str | GenerationResult]:
        """Stream a generation; see :meth:`Generation.generate_stream`."""
        return self.generation.generate_stream(prompt, **options)

    def serve(self, blocks: str = "auto", *, device: str | None = None, dtype: str | None = None,
              quant_type: str = "auto", model: str | None = None) -> threading.Thread:
        """Serve blocks from this kernel in the background; see :meth:`KernelServing.serve`."""
        thread = self.serving.serve(blocks, device=device, dtype=dtype, quant_type=quant_type, model=model)
        self.publisher.start()
        return thread

    def wait_serving(self, timeout: float = 300.0) -> str:
        """Wait until serving has started or failed; returns the serve state."""
        return self.serving.wait_serving(timeout)

    def stop_serving(self, wait: bool = True) -> None:
        """Stop the served span (announces it offline)."""
        self.serving.stop_serving(wait)

    def start_api(self, *, host: str = "127.0.0.1", port: int = 8000) -> str:
        """Serve an OpenAI-compatible API for the connected model from this kernel (background); returns its URL."""
        import os

        from jupyter_swarm.api.server import ApiServer
        from jupyter_swarm.errors import ConfigurationError

        model = self.connection.require_model()
        if self.api is not None:
            raise ConfigurationError(f"the API already runs on {self.api.url}: `%swarm api --stop` first")
        name = os.path.basename(os.path.normpath(self.connection.model_path or "model"))
        self.api = ApiServer(model, self.connection.tokenizer, name, host=host, port=port).start()
        return self.api.url

    def stop_api(self) -> None:
        """Stop the API (if it runs)."""
        api, self.api = self.api, None
        if api is not None:
            api.stop()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able picture of the swarm as this kernel knows it (what the Jupyter server shows)."""
        return build_snapshot(self.connection, self.generation, self.serving)

    def shutdown(self) -> None:
        """Stop everything this kernel started (called at kernel exit)."""
        self.publisher.close()  # no more state files...
        try:
            self.disconnect()
        finally:
            self.serving.stop_serving(wait=True)
            self.publisher.close()  # ...and none left behind by a write that was under way

    # ---- the publisher's hooks -------------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.connected or self.serving.state != "idle"

    def _refresh_map(self) -> None:
        if self.connected:
            self.connection.read_map(max_age=1.5)

    def _handle_request(self, request: dict[str, Any]) -> None:
        action = request.get("action")
        if action == "serve":
            try:
                params = request.get("params", {})
                self.serve(str(params.get("blocks", "auto")), quant_type=str(params.get("quant_type", "auto")))
            except Exception as e:  # noqa: BLE001 - shown in the panel
                self.serving.state, self.serving.error = "error", describe_error(e)
        elif action == "stop":
            threading.Thread(target=self.stop_serving, daemon=True).start()


_kernel_swarm: KernelSwarm | None = None
_kernel_swarm_lock = threading.Lock()


def get_kernel_swarm() -> KernelSwarm:
    """This kernel's swarm (created on first use)."""
    global _kernel_swarm
    with _kernel_swarm_lock:
        if _kernel_swarm is None:
            _kernel_swarm = KernelSwarm()
        return _kernel_swarm
