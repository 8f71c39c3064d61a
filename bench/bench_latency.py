#!/usr/bin/env python
"""Time per token over links with emulated latency: client-driven chain vs server-to-server push, vs the floor.

    python bench/bench_latency.py                     # 3 servers, 50 ms one-way per link, 24 new tokens, 3 reps
    python bench/bench_latency.py --delay 0.05 --servers 3 --json bench/results/latency.json

Every server sits behind a user-space proxy (bench/latency_proxy.py) that delays each byte by ``--delay`` seconds in
each direction, and announces the proxy's address, so every connection to it (from the client or another server)
pays that one-way delay. The client generates greedily through the chain; per-token time is the decode time
(the first token, which includes opening the session, is left out). Floors per token:
  client-driven: 2 x delay per server (a round trip each) + compute;
  push (the physical floor): delay x (servers + 1) -- client -> s1 -> ... -> sN -> client -- + compute,
where compute is the time per token of the same swarm, same mode, with the proxies' delay set to 0 (so it holds
the servers' and the client's work and loopback costs, everything but the emulated latency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from jupyter_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from jupyter_swarm.local_swarm import ServerProcess  # noqa: E402
from jupyter_swarm.models import make_tiny_model  # noqa: E402
from latency_proxy import DelayProxy, free_port  # noqa: E402


class _Clock:
    """A generate() streamer recording when each token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def per_token(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    clock = _Clock()
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # [0] is the prompt, [1] the first token
    return statistics.median(gaps), out[0].tolist()


def start_delayed_servers(path: str, cuts: list[int], delay: float, proxies: list[DelayProxy],
                          servers: list[ServerProcess]) -> list[str]:
    """One server per span ``cuts[k]:cuts[k + 1]``, each behind a proxy delaying ``delay`` s each way (appended to
    ``proxies`` and ``servers`` as they start, for the caller to stop); returns the first server's addresses."""
    peers: list[str] = []
    for k in range(len(cuts) - 1):
        listen, public = free_port(), free_port()
        proxies.append(DelayProxy(public, listen, delay).start())
        server = ServerProcess(path, cuts[k], cuts[k + 1], initial_peers=peers,
                               extra_args=["--torch-threads", "1", "--update-period", "5", "--balance-period", "0",
                                           "--listen", f"/ip4/127.0.0.1/tcp/{listen}",
                                           "--announce", f"/ip4/127.0.0.1/tcp/{public}"])
        servers.append(server.wait_ready(180))
        peers = servers[0].addrs
    return peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.05, help="one-way delay per link, seconds")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-latency-")
    path = make_tiny_model(f"{tmp}/model", family="llama", hidden_size=128, num_layers=6, num_heads=4,
                           num_kv_heads=2, seed=1)
    blocks = 6
    cuts = [round(k * blocks / args.servers) for k in range(args.servers + 1)]
    proxies, servers = [], []
    prompt = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])
    try:
        peers = start_delayed_servers(path, cuts, args.delay, proxies, servers)
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        local_times, expected = [], None
        for _ in range(args.reps):
            t, expected = per_token(local, prompt, args.new_tokens)
            local_times.append(t)
        compute = statistics.median(local_times)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, wait_for_coverage=60)
        results, zero_delay = {}, {}
        for delay, into in ((0.0, zero_delay), (args.delay, results)):
            for proxy in proxies:
                proxy.delay = delay
            for mode in ("client-driven", "push"):
                model.swarm.push = mode == "push"
                times = []
                for _ in range(args.reps):
                    t, tokens = per_token(model, prompt, args.new_tokens)
                    assert tokens == expected, "the swarm's tokens differ from the local model's"
                    times.append(t)
                into[mode] = statistics.median(times)
        pings = model.swarm.pings.to_dict()
        model.close()
    finally:
        for server in servers:
            server.stop()
        for proxy in proxies:
            proxy.stop()
    n, d = args.servers, args.delay
    floors = {"client-driven": 2 * d * n + zero_delay["client-driven"], "push": d * (n + 1) + zero_delay["push"]}
    report = dict(servers=n, one_way_delay_s=d, local_generate_per_token_s=compute,
                  zero_delay_per_token_s=zero_delay,
                  client_pings_s=pings,
                  per_token_s=results, floor_per_token_s=floors,
                  ratio_to_own_floor={m: results[m] / floors[m] for m in results},
                  ratio_to_physical_floor={m: results[m] / floors["push"] for m in results})
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
