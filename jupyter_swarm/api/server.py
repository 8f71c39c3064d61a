"""Running the API: in the foreground (``jupyter-swarm api``) or in a background thread (``%swarm api``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from jupyter_swarm.api.engine import Engine
from jupyter_swarm.errors import ConfigurationError, MissingDependencyError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _uvicorn() -> Any:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingDependencyError(f"the OpenAI-compatible API needs FastAPI and uvicorn ({e.name} is missing): "
                                     "pip install 'jupyter-swarm[api]'") from None
    return uvicorn


class ApiServer:
    """The API for one model on ``host:port``; :meth:`start` runs it in a background thread, :meth:`stop` ends it."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str, *, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT):
        uvicorn = _uvicorn()
        from jupyter_swarm.api.app import create_app

        self.engine = Engine(model, tokenizer, model_name)
        config = uvicorn.Config(create_app(self.engine), host=host, port=port, log_level="warning",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API's base URL, e.g. http://127.0.0.1:8000/v1 (the ``base_url`` of an OpenAI client)."""
        config = self._server.config
        port = config.port
        if self._server.started and self._server.servers:  # port 0: the one the system gave
            port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://{config.host}:{port}/v1"

    def run(self) -> None:
        """Serve in this thread until Ctrl-C."""
        self._server.run()

    def start(self, timeout: float = 30.0) -> "ApiServer":
        """Serve in a background thread; returns once it listens."""
        self._thread = threading.Thread(target=self._server.run, name="jupyter-swarm-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError(f"the API could not listen on {self._server.config.host}:"
                                         f"{self._server.config.port} (is the port taken?)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop serving (requests in progress finish first)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
