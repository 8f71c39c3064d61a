"""The /swarm/ endpoints go through Jupyter's authorizer (resource "swarm") and its XSRF check."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pytest_jupyter")
from jupyter_server.auth.authorizer import Authorizer  # noqa: E402
from tornado.httpclient import HTTPClientError  # noqa: E402

from jupyter_swarm.notebook import state as state_files  # noqa: E402

pytest_plugins = ("pytest_jupyter.jupyter_server",)


class ReadOnlySwarm(Authorizer):
    """Lets users read anything but not write the swarm resource; remembers what it was asked."""

    asked: list[tuple[str, str]] = []

    def is_authorized(self, handler, user, action, resource) -> bool:  # noqa: ANN001
        self.asked.append((action, resource))
        return not (resource == "swarm" and action == "write")


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_swarm_server": True},
                          "authorizer_class": ReadOnlySwarm}}


@pytest.fixture(autouse=True)
def connected_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_SWARM_STATE_DIR", str(tmp_path / "swarm-state"))
    state_files.write_state({"connected": True, "model": "demo-llama", "serve": {"state": "idle"}})


async def test_authorizer_decides_on_the_swarm_resource(jp_fetch) -> None:
    ReadOnlySwarm.asked.clear()
    assert (await jp_fetch("swarm", "state")).code == 200
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("swarm", "serve", method="POST", body=json.dumps({"action": "start"}))
    assert e.value.code == 403
    assert ("read", "swarm") in ReadOnlySwarm.asked and ("write", "swarm") in ReadOnlySwarm.asked
    assert state_files.take_request() is None  # the refused request never reached the kernel


async def test_cookie_authenticated_post_needs_xsrf(jp_fetch) -> None:
    """A browser session (login cookie, no token) must send the XSRF token with a POST, as every Jupyter API."""
    login = await jp_fetch("swarm", "state")  # token-authenticated: the server sets its login cookie
    cookies = [c.split(";", 1)[0] for c in login.headers.get_list("Set-Cookie")]
    assert cookies, "the server set no login cookie"
    no_token = {"Authorization": "", "Cookie": "; ".join(cookies)}
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("swarm", "serve", method="POST", body=json.dumps({"action": "stop"}), headers=no_token)
    assert e.value.code == 403 and b"xsrf" in e.value.response.body.lower()
    assert state_files.take_request() is None
    xsrf = "0123456789abcdef0123456789abcdef"
    with_xsrf = {**no_token, "Cookie": no_token["Cookie"] + f"; _xsrf={xsrf}", "X-XSRFToken": xsrf}
    with pytest.raises(HTTPClientError) as e:  # past XSRF and authentication, refused by the authorizer
        await jp_fetch("swarm", "serve", method="POST", body=json.dumps({"action": "stop"}), headers=with_xsrf)
    assert e.value.code == 403 and b"not authorized" in e.value.response.body.lower()
    assert (await jp_fetch("swarm", "state", headers={"Authorization": "", "Cookie": no_token["Cookie"]})).code == 200
