"""What `jupyter-swarm serve` tells its user (its stages at INFO) and `jupyter-swarm status --json`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jupyter_swarm.dht.naming import model_prefix
from tests.integration.conftest import start_swarm

pytestmark = pytest.mark.integration


def test_serve_logs_its_stages_and_status_prints_json(model_path) -> None:
    path = model_path("llama")
    with start_swarm(path, [(0, 3), (1, 4)]) as swarm:
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
