"""Automatic placement and rebalancing with real server processes on loopback.

Five servers started with automatic placement one after another cover every block with no spans given; two of
them are SIGKILLed and the remaining three move to re-cover the holes within a few refresh periods, while a
client keeps generating through the swarm and gets the local model's tokens every time.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from jupyter_swarm.client.status import read_swarm_status
from jupyter_swarm.local_swarm import LocalSwarm
from jupyter_swarm.models import make_tiny_model

NUM_BLOCKS = 10
PERIODS = ["--update-period", "1", "--balance-period", "1"]
AUTO_ARGS = ["--torch-threads", "1", *PERIODS, "--num-blocks", "4", "--throughput", "10"]
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])


@pytest.fixture(scope="module")
def ten_block_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("balancing") / "llama10"), family="llama", hidden_size=64,
                           num_layers=NUM_BLOCKS, num_heads=4, num_kv_heads=2, seed=11)


def _coverage(peers: list[str]) -> tuple[list[int], dict[str, tuple[int, int]]]:
    status = read_swarm_status(peers)["llama10"]
    return status.missing_blocks(), {p: (r.start, r.end) for p, r in status.servers.items()
                                     if r.state.value == "online"}


def test_auto_placement_covers_and_recovers_after_two_servers_die(ten_block_model, connect, local_model):
    path = ten_block_model
    expected = local_model(path).generate(PROMPT, max_new_tokens=12, do_sample=False).tolist()
    swarm = LocalSwarm(path, [(None, None)], extra_args=AUTO_ARGS)  # no spans given: automatic placement
    try:
        for _ in range(4):  # one after another, each placing itself where the swarm is weakest
            swarm.add_server()
        spans = [(s.start_block, s.end_block) for s in swarm.servers]
        covered = {b for start, end in spans for b in range(start, end)}
        assert covered == set(range(NUM_BLOCKS)), spans
        assert spans[:3] == [(0, 4), (4, 8), (6, 10)], spans  # the first three fill the empty blocks first

        model = connect(path, swarm, wait_for_coverage=60.0)
        results: list[list[int]] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def generate_all_along() -> None:
            try:
                while not done.is_set():
                    results.append(model.generate(PROMPT, max_new_tokens=12, do_sample=False).tolist())
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        worker = threading.Thread(target=generate_all_along, daemon=True)
        worker.start()
        time.sleep(1.0)

        # kill the two servers whose loss leaves holes (blocks 8-9 are held only by the third)
        peers = [a for s in (swarm.servers[0], swarm.servers[3]) for a in s.addrs]
        swarm.servers[1].kill()
        swarm.servers[2].kill()
        killed_at = time.monotonic()
        missing, online = _coverage(peers)
        deadline = killed_at + 30
        saw_hole = False
        while time.monotonic() < deadline:
            missing, online = _coverage(peers)
            alive = {swarm.servers[i].peer_id for i in (0, 3, 4)}
            saw_hole = saw_hole or bool(missing)
            if not missing and set(online) == alive:
                break
            time.sleep(0.5)
        recovered_after = time.monotonic() - killed_at
        assert not missing and set(online) == alive, (missing, online)
        assert recovered_after < 20, recovered_after  # a few refresh periods (1 s) and balance checks (mean 1 s)
        before = len(results)
        deadline = time.monotonic() + 60
        while len(results) < before + 2 and not errors and time.monotonic() < deadline:
            time.sleep(0.2)
        done.set()
        worker.join(60)
        assert not errors, errors
        assert len(results) >= before + 2
        assert all(r == expected for r in results), "a generation during the churn gave different tokens"
        moved = [s for s in swarm.servers if any("rebalancing: moving" in line for line in s.output)]
        assert moved, "no server moved to re-cover the holes"
        print(f"re-covered {recovered_after:.1f} s after the kills (hole seen: {saw_hole}); "
              f"{len(results)} generations, all equal to local")
    finally:
        swarm.stop()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jupyter_swarm.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_contradictory_placement_options_are_refused(ten_block_model):
    out = _cli("serve", ten_block_model, "--new-swarm", "--blocks", "0:4", "--num-blocks", "3")
    assert out.returncode == 2 and "contradict" in out.stderr
    out = _cli("serve", ten_block_model, "--new-swarm", "--num-blocks", "11")
    assert out.returncode == 2 and "outside the model" in out.stderr
    out = _cli("serve", ten_block_model, "--new-swarm", "--blocks", "0:4", "--memory-mib", "100")
    assert out.returncode == 2 and "contradict" in out.stderr
    out = _cli("serve", ten_block_model, "--new-swarm", "--throughput", "-3")
    assert out.returncode == 2 and "positive" in out.stderr
