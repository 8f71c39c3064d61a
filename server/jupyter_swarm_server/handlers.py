"""REST handlers under ``/swarm/``.

Every handler authenticates (Jupyter's token or login cookie, with its XSRF check on POST) and then asks Jupyter's
authorizer for the action ("read" for GET, "write" for POST) on the resource ``swarm``, so a deployment that
restricts users (e.g. JupyterHub scopes, a custom ``ServerApp.authorizer_class``) governs these endpoints too.
"""

from __future__ import annotations

import json
import time
from typing import Any

import tornado
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from jupyter_swarm.notebook import state as state_files

AUTH_RESOURCE = "swarm"


class SwarmHandler(APIHandler):
    """Base of the ``/swarm/`` handlers: the resource name Jupyter's authorizer sees."""

    auth_resource = AUTH_RESOURCE


class StateHandler(SwarmHandler):
    """What every live kernel's swarm knows: model, coverage, servers, this kernel's serving."""

    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(json.dumps({"kernels": state_files.read_states(), "time": time.time()}))


class ServeHandler(SwarmHandler):
    """Ask a kernel to start or stop serving blocks (it acts within about a second)."""

    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        try:
            body: Any = self.get_json_body() or {}
        except Exception:  # noqa: BLE001 - a malformed body is the client's error
            body = None
        if not isinstance(body, dict) or body.get("action") not in ("start", "stop"):
            self.set_status(400)
            self.finish(json.dumps({"error": 'send {"action": "start" | "stop"} (optionally "pid", "blocks")'}))
            return
        blocks = body.get("blocks", "auto")
        if not isinstance(blocks, str):
            self.set_status(400)
            self.finish(json.dumps({"error": '"blocks" must be "auto" or "START:END"'}))
            return
        states = state_files.read_states()
        pid = body.get("pid")
        if pid is not None:
            states = [s for s in states if s.get("pid") == pid]
        else:
            states = [s for s in states if s.get("connected")] or states
        if not states:
            self.set_status(404)
            self.finish(json.dumps({"error": "no kernel is connected to a swarm: run `%swarm connect ...` "
                                             "in a notebook first"}))
            return
        target = states[0]["pid"]
        if body["action"] == "start":
            state_files.post_request(target, "serve", blocks=blocks)
        else:
            state_files.post_request(target, "stop")
        self.set_status(202)
        self.finish(json.dumps({"pid": target, "action": body["action"]}))


def setup_handlers(web_app: Any) -> None:
    base = url_path_join(web_app.settings["base_url"], "swarm")
    web_app.add_handlers(".*$", [(url_path_join(base, "state"), StateHandler),
                                 (url_path_join(base, "serve"), ServeHandler)])
