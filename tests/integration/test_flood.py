"""Flood: 50 hostile clients at once against one server (sessions at maximum length holding cache, more streams
than it takes, oversized frames, record spam) while an honest client generates: its tokens are the local model's.
The time per token under the flood is measured in bench/bench_flood.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.integration.conftest import start_swarm

REPO = Path(__file__).resolve().parents[2]
PROMPT = torch.tensor([[1, 17, 42, 99, 7]])
HOSTILE_CLIENTS = 50


def test_fifty_hostile_clients_do_not_change_an_honest_clients_tokens(model_path, connect, local_model):
    path = model_path("llama")
    expected = local_model(path).generate(PROMPT, max_new_tokens=12, do_sample=False).tolist()
    # 1 MiB of cache holds 1024 tokens of this model: the hostile sessions (96 KiB each) fill it many times over
    with start_swarm(path, [(0, 4)], extra_args=["--cache-mib", "1"]) as swarm:
        model = connect(path, swarm)
        attacker = subprocess.Popen([sys.executable, "-m", "tests.integration.flood", swarm.servers[0].addrs[0],
                                     "--clients", str(HOSTILE_CLIENTS), "--fill", "64", "--hidden-size", "64"],
                                    cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert attacker.stdout is not None and attacker.stdout.readline().strip() == "ready"
            time.sleep(3)  # the flood is on
            generated = [model.generate(PROMPT, max_new_tokens=12, do_sample=False).tolist() for _ in range(3)]
        finally:
            attacker.terminate()
            out, _ = attacker.communicate(timeout=120)
        stats = json.loads(out.strip().splitlines()[-1])
        server = swarm.servers[0]
        assert server.process.poll() is None, "".join(server.output[-30:])
        assert not any("Traceback" in line for line in server.output), "".join(server.output[-60:])
    assert generated == [expected] * 3
    print(json.dumps(stats, sort_keys=True))
    # every attack ran, and the server met each with its limits
    assert stats["session fills: ok:output"] > HOSTILE_CLIENTS  # sessions that held cache ...
    assert sum(n for kind, n in stats.items() if "evicted your idle" in kind) > 0  # ... and were evicted for others
    assert stats["oversized frames"] > HOSTILE_CLIENTS
    assert sum(n for kind, n in stats.items() if "over the N-byte limit" in kind) > 0
    assert stats["record requests"] > HOSTILE_CLIENTS
    assert stats["streams opened /jupyter-swarm/rpc/2.0.0"] >= HOSTILE_CLIENTS
