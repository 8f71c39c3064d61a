"""jupyter-server extension: the swarm state that kernels publish, under ``/swarm/``.

    GET  /swarm/state   {"kernels": [state, ...]}: every live kernel connected to a swarm or serving blocks
    POST /swarm/serve   {"action": "start" | "stop", "pid": optional kernel pid, "blocks": "auto" | "A:B"}

Handlers are Jupyter ``APIHandler``s: the same token/cookie authentication and XSRF rules as every Jupyter API.
The extension only reads what each kernel's swarm publishes (``jupyter_swarm.notebook.state``) and leaves
requests for it; it never talks to the swarm itself.
"""

from __future__ import annotations

from typing import Any

from jupyter_swarm_server.handlers import setup_handlers


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyter_swarm_server"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    setup_handlers(server_app.web_app)
    server_app.log.info("jupyter_swarm_server: /swarm/state and /swarm/serve are up")
