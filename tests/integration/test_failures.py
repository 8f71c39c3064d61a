"""Servers die, clients route around them; dead servers vanish from the swarm map."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from jupyter_swarm.client.status import format_status, read_swarm_status
from tests.integration.conftest import start_swarm

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])


class _KillMidGeneration:
    """A generate() streamer that SIGKILLs the server holding ``block`` after ``after`` tokens."""

    def __init__(self, model, swarm, block: int, after: int):
        self.model, self.swarm, self.block, self.after = model, swarm, block, after
        self.count = 0
        self.killed: str | None = None

    def put(self, value) -> None:
        self.count += 1
        if self.count == self.after:
            route = next(r for r in self.model.active_session.routes if r.start <= self.block < r.end)
            server = next(s for s in self.swarm.servers if s.peer_id == route.peer_id)
            server.kill()
            self.killed = route.peer_id

    def end(self) -> None:
        pass


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "client-driven"])
def test_sigkill_mid_generation_recovers_with_same_tokens(model_path, connect, local_model, relay):
    path = model_path("llama")
    # blocks 2-3 are held by two servers; the spare (1:4) also covers them from a different start
    with start_swarm(path, [(0, 2), (2, 4), (1, 4)]) as swarm:
        model = connect(path, swarm)
        model.swarm.push = relay  # relayed: the chain is rebuilt and replayed; client-driven: the failed span only
        killer = _KillMidGeneration(model, swarm, block=3, after=10)
        with model.inference_session(max_length=64) as session:
            got = model.generate(PROMPT, max_new_tokens=40, do_sample=False, streamer=killer)
            assert killer.killed is not None
            assert session.failovers >= 1
            assert all(r.peer_id != killer.killed for r in session.routes)
        expected = local_model(path).generate(PROMPT, max_new_tokens=40, do_sample=False)
        assert got.tolist() == expected.tolist()


def test_forward_retries_on_another_server(model_path, connect, local_model):
    path = model_path("llama")
    with start_swarm(path, [(0, 4), (0, 4)]) as swarm:
        model = connect(path, swarm)
        batch = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            model(batch)  # warms up the streams to one of them
            swarm.servers[0].kill()
            got = model(batch).logits
            swarm.servers[1].process.poll()
            expected = local_model(path)(batch).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_dead_server_disappears_from_status(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        peers = swarm.initial_peers[:1]
        victim = swarm.servers[1]
        status = read_swarm_status(peers)
        assert set(status) == {"llama"}
        assert victim.peer_id in status["llama"].servers
        assert status["llama"].missing_blocks() == []
        cli = subprocess.run([sys.executable, "-m", "jupyter_swarm.cli", "status", "--initial-peers", *peers],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert victim.peer_id in cli.stdout and "all blocks covered" in cli.stdout

        victim.kill()  # no goodbye: its records must expire on their own (update period 2 s -> TTL 4 s)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = read_swarm_status(peers)
            if victim.peer_id not in status["llama"].servers:
                break
            time.sleep(1)
        assert victim.peer_id not in status["llama"].servers
        assert status["llama"].missing_blocks() == [2, 3]
        assert "MISSING blocks [2, 3]" in format_status(status)


def test_local_swarm_servers_stop_when_their_parent_is_killed(model_path):
    """A notebook kernel that dies (SIGKILL) must not leave its local servers and their ports behind."""
    path = model_path("llama")
    script = ("import time; from jupyter_swarm.local_swarm import LocalSwarm; "
              f"swarm = LocalSwarm({path!r}, [(0, 4)], new_session=True); "
              "print(swarm.servers[0].process.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        os.kill(server_pid, 0)  # it is up
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(server_pid):
            time.sleep(0.5)
        assert not _alive(server_pid), "the server outlived the process that started it"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited and only awaits reaping
    except FileNotFoundError:
        return False
