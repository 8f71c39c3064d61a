"""The jupyter-server extension's REST API under /swarm/, with pytest-jupyter's server fixtures."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("pytest_jupyter")
from tornado.httpclient import HTTPClientError  # noqa: E402

from jupyter_swarm.notebook import state as state_files  # noqa: E402

pytest_plugins = ("pytest_jupyter.jupyter_server",)


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_swarm_server": True}}}


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_SWARM_STATE_DIR", str(tmp_path / "swarm-state"))
    return tmp_path / "swarm-state"


async def test_state_is_empty_without_kernels(jp_fetch) -> None:
    response = await jp_fetch("swarm", "state")
    assert response.code == 200
    assert json.loads(response.body)["kernels"] == []


async def test_state_lists_live_kernels_only(jp_fetch, state_dir) -> None:
    state_files.write_state({"connected": True, "model": "demo-llama", "num_blocks": 8, "coverage": [1] * 8,
                             "serve": {"state": "idle"}})
    state_files.write_state({"connected": True, "model": "gone"}, pid=2**22 + 12345)  # no such process
    kernels = json.loads((await jp_fetch("swarm", "state")).body)["kernels"]
    assert [k["model"] for k in kernels] == ["demo-llama"]
    assert kernels[0]["pid"] == os.getpid() and kernels[0]["coverage"] == [1] * 8


async def test_serve_start_and_stop_leave_requests_for_the_kernel(jp_fetch) -> None:
    state_files.write_state({"connected": True, "model": "demo-llama", "serve": {"state": "idle"}})
    response = await jp_fetch("swarm", "serve", method="POST", body=json.dumps({"action": "start"}))
    assert response.code == 202 and json.loads(response.body)["pid"] == os.getpid()
    assert state_files.take_request() == {"action": "serve", "params": {"blocks": "auto"},
                                          "time": pytest.approx(0, abs=1e12)}
    await jp_fetch("swarm", "serve", method="POST", body=json.dumps({"action": "stop", "pid": os.getpid()}))
    assert state_files.take_request()["action"] == "stop"
    assert state_files.take_request() is None


async def test_serve_errors(jp_fetch) -> None:
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("swarm", "serve", method="POST", body=json.dumps({"action": "start"}))
    assert e.value.code == 404 and b"%swarm connect" in e.value.response.body
    state_files.write_state({"connected": True, "serve": {"state": "idle"}})
    for body in ({"action": "explode"}, {"action": "start", "blocks": 3}, []):
        with pytest.raises(HTTPClientError) as e:
            await jp_fetch("swarm", "serve", method="POST", body=json.dumps(body))
        assert e.value.code == 400


async def test_api_needs_authentication(jp_fetch) -> None:
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("swarm", "state", headers={"Authorization": "token wrong"})
    assert e.value.code == 403
