"""The command line around a running swarm: what `jupyter-swarm serve` tells its user (its stages at INFO),
`jupyter-swarm status --json`, and `jupyter-swarm api` answering OpenAI requests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from jupyter_swarm.dht.naming import model_prefix
from tests.integration.conftest import start_swarm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swarm_and_path(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 3), (1, 4)]) as swarm:
        yield swarm, path


def test_serve_logs_its_stages_and_status_prints_json(swarm_and_path) -> None:
    swarm, path = swarm_and_path
    log = "".join(swarm.servers[1].output)
    stages = ["INFO jupyter_swarm.runtime.server: joining the swarm through 1 initial peer(s)",
              "INFO jupyter_swarm.runtime.server: choosing blocks: 1:4, as given",
              f"INFO jupyter_swarm.runtime.server: loading weights 1:4 of {path} on cpu (quant type none)",
              "INFO jupyter_swarm.runtime.server: measuring throughput",
              "INFO jupyter_swarm.runtime.server: serving blocks 1:4"]
    positions = [log.find(stage) for stage in stages]
    assert -1 not in positions and positions == sorted(positions), log
    done = subprocess.run([sys.executable, "-m", "jupyter_swarm.cli", "status", "--json", "--initial-peers",
                           *swarm.initial_peers], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)["models"][model_prefix(path)]
    assert (status["num_blocks"], status["coverage"], status["missing_blocks"]) == (4, [1, 2, 2, 1], [])
    servers = {s["peer_id"]: s for s in status["servers"]}
    assert set(servers) == {s.peer_id for s in swarm.servers}
    assert (servers[swarm.servers[1].peer_id]["start"], servers[swarm.servers[1].peer_id]["end"]) == (1, 4)
    assert all(s["state"] == "online" and s["ttl_left"] > 0 and s["addrs"] for s in servers.values())


def test_api_command_answers_openai_requests_until_ctrl_c(swarm_and_path, local_model) -> None:
    import httpx
    from transformers import AutoTokenizer

    swarm, path = swarm_and_path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = subprocess.Popen([sys.executable, "-m", "jupyter_swarm.cli", "api", path, "--port", str(port),
                            "--model-name", "tiny", "--initial-peers", *swarm.initial_peers],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                assert httpx.get(f"{url}/models", timeout=5).json()["data"][0]["id"] == "tiny"
                break
            except httpx.TransportError:
                assert api.poll() is None and time.monotonic() < deadline, api.stdout.read() if api.stdout else ""
                time.sleep(0.5)
        reply = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "Once upon a time",
                                                       "max_tokens": 6, "temperature": 0}, timeout=120).json()
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
        expected = local_model(path).generate(prompt, max_new_tokens=6, do_sample=False)
        assert reply["choices"][0]["text"] == tokenizer.decode(expected[0, prompt.shape[1]:],
                                                               skip_special_tokens=True)
        api.send_signal(signal.SIGINT)
        assert api.wait(30) == 0
        assert f"OpenAI-compatible API for tiny on http://127.0.0.1:{port}/v1" in api.stdout.read()
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()
