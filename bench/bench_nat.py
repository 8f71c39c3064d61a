#!/usr/bin/env python
"""Generation across NATs: per-token latency of a 2-server chain reached directly, by hole punching and through a
relay, against the same chain on loopback; and how long a server started at home takes to be used elsewhere.

    sudo python bench/bench_nat.py                       # ~3 min: every path, 48 new tokens, 5 reps
    sudo python bench/bench_nat.py --relay-delay 0.02    # the relay 20 ms (one way) away from everyone
    sudo python bench/bench_nat.py --json bench/results/nat.json

Needs root, `ip` and `nft` (network namespaces; tests/support/netns.py builds the topology). One swarm holds four
copies of the chain (blocks 0:4 and 4:8 of bench_inference.py's 26M-parameter model):

    public    both servers on the "internet" namespace: the client (in home 3, behind NAT) dials them directly
    punched   servers in homes 1 and 2 behind NATs that keep ports: reached through the bootstrap's relay first,
              then directly once hole punching has succeeded (the script waits for that)
    relayed   servers in homes 4 and 5 behind NATs that map each destination to a new port: always relayed
    loopback  the same chain as `jupyter-swarm serve` processes on loopback, with a client in this process

The client restricts routes to one copy at a time (allowed_servers) and alternates copies every rep, so they share
the machine's load; per-token time is the median gap between tokens after the first (decode only). Ratios are
against loopback in the same run. ``--relay-delay`` puts a user-space delay proxy (bench/latency_proxy.py) in
front of the bootstrap node, so every relayed byte pays it twice per round trip (this kernel has no netem; the
direct paths between namespaces have no added delay, so that variant shows what hole punching saves when the
relay is farther away than the other home).

Time to first use: a server for blocks 0:4 starts in home 1 (its peer id is known in advance from an identity file)
while the client in home 3 retries one-token generations allowed only through it and the home-2 server; the
figure is from the process start to the first generation that went through it (its imports and model load
included), and from its "ready" line to that generation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import bench_model  # noqa: E402

from jupyter_swarm.local_swarm import LocalSwarm, ServerProcess  # noqa: E402
from jupyter_swarm.p2p.identity import load_or_create_identity  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from tests.support.nat_swarm import REPO, SERVER_ARGS, BootstrapProcess, start_client, start_server  # noqa: E402
from tests.support.netns import Topology, unavailable_reason  # noqa: E402

PROMPT = [[1, 17, 42, 99, 7, 230, 11, 5]]


def decode_seconds_per_token(token_times: list[float]) -> float:
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return statistics.median(gaps)


def _proxy_command(listen: str, target: str, delay: float) -> list[str]:
    code = ("import sys, time, asyncio\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from latency_proxy import DelayProxy\n"
            "lh, lp = sys.argv[2].split(':'); th, tp = sys.argv[3].split(':')\n"
            "p = DelayProxy(int(lp), int(tp), float(sys.argv[4]), listen_host=lh, target_host=th).start()\n"
            "print('proxy ready', flush=True)\n"
            "while True: time.sleep(3600)\n")
    return [sys.executable, "-c", code, str(Path(__file__).resolve().parent), listen, target, str(delay)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--relay-delay", type=float, default=0.0, help="one-way seconds added in front of the relay")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "results" / "models"))
    parser.add_argument("--skip-latency", action="store_true", help="measure only the time to first use")
    parser.add_argument("--skip-first-use", action="store_true", help="measure only per-token latency")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"bench_nat needs network namespaces: {reason}")
    tag, path = bench_model(args.cache_dir)
    topo = Topology(homes_count=5, symmetric_homes=[4, 5]).build()
    procs: list = []
    local = None
    client = None
    results: dict = {"model": tag, "new_tokens": args.new_tokens, "reps": args.reps, "relay_delay": args.relay_delay}
    try:
        h1, h2, h3, h4, h5 = topo.homes
        internet = topo.command(topo.internet, [])
        if args.relay_delay > 0:
            # the bootstrap listens on loopback behind a proxy that delays every byte both ways
            boot = BootstrapProcess(["--listen", "/ip4/127.0.0.1/tcp/31337", "--announce",
                                     f"/ip4/{topo.internet_ip}/tcp/31400"], launcher=internet)
            proxy = topo.popen(topo.internet, _proxy_command(f"{topo.internet_ip}:31400", "127.0.0.1:31337",
                                                             args.relay_delay), stdout=subprocess.PIPE, text=True)
            assert proxy.stdout is not None and "ready" in proxy.stdout.readline()
            boot.wait_ready()
            peers = [f"/ip4/{topo.internet_ip}/tcp/31400/p2p/{boot.peer_id}"]
        else:
            boot = BootstrapProcess(launcher=internet).wait_ready()
            peers = boot.addrs
        procs.append(boot)
        chains = {"public": [(topo.internet, 0, 4), (topo.internet, 4, 8)],
                  "punched": [(h1.host, 0, 4), (h2.host, 4, 8)],
                  "relayed": [(h4.host, 0, 4), (h5.host, 4, 8)]}
        servers = {name: [start_server(topo, ns, path, a, b, peers) for ns, a, b in spans]
                   for name, spans in chains.items()}
        for group in servers.values():
            procs.extend(group)
            for server in group:
                server.wait_ready(300)
        client = start_client(topo, h3.host, tempfile.mktemp(prefix="bench-nat-client-", suffix=".log"))
        client.ask(cmd="connect", model=path, peers=peers)
        local = LocalSwarm(path, [(0, 4), (4, 8)], extra_args=SERVER_ARGS)
        from jupyter_swarm import AutoDistributedModelForCausalLM
        import torch

        loop_model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local.initial_peers)

        def loopback_once() -> tuple[float, list]:
            times: list[float] = []

            class Clock:
                first = True

                def put(self, value: object) -> None:
                    if self.first:
                        self.first = False
                        return
                    times.append(time.perf_counter())

                def end(self) -> None:
                    pass

            out = loop_model.generate(torch.tensor(PROMPT), max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, streamer=Clock())
            return decode_seconds_per_token(times), out.tolist()

        def remote_once(name: str) -> tuple[float, list, dict]:
            allowed = [s.peer_id for s in servers[name]]
            answer = client.ask(cmd="generate", prompt=PROMPT, max_new_tokens=args.new_tokens, push=True,
                                allowed=allowed, min_new_tokens=args.new_tokens, max_length=len(PROMPT[0]) + args.new_tokens + 8)
            return decode_seconds_per_token(answer["token_times"]), answer["tokens"], answer["links"]

        if not args.skip_latency:
            # warm up every path; wait for the home servers' relayed connections to be hole-punched
            for name in servers:
                remote_once(name)
            loopback_once()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                links = client.ask(cmd="links")["links"]
                if all(links.get(s.peer_id) == "hole-punched" for s in servers["punched"]):
                    break
                time.sleep(1)
            per_token: dict[str, list[float]] = {name: [] for name in ["loopback", *servers]}
            seen_links: dict[str, dict] = {}
            reference = None
            order = ["loopback", *servers]
            for rep in range(args.reps):
                for name in order[rep % len(order):] + order[:rep % len(order)]:
                    if name == "loopback":
                        seconds, tokens = loopback_once()
                    else:
                        seconds, tokens, seen_links[name] = remote_once(name)
                    reference = reference or tokens
                    assert tokens == reference, f"{name}: tokens differ from the other paths"
                    per_token[name].append(seconds)
            base = statistics.median(per_token["loopback"])
            results["per_token_ms"] = {k: round(1000 * statistics.median(v), 3) for k, v in per_token.items()}
            results["ratio_vs_loopback"] = {k: round(statistics.median(v) / base, 3) for k, v in per_token.items()}
            results["links"] = {name: sorted(set(v.values())) for name, v in seen_links.items()}
            print(json.dumps(results, indent=1), flush=True)

        if not args.skip_first_use:
            # ---- time from `serve` at home to its first use elsewhere -------------------------------------------
            key = os.path.join(tempfile.mkdtemp(prefix="bench-nat-"), "home1.key")
            peer = str(ID.from_pubkey(load_or_create_identity(key).public_key))
            began = time.time()
            newcomer = ServerProcess(path, 0, 4, initial_peers=peers, extra_args=[*SERVER_ARGS, "--identity", key],
                                     launcher=topo.command(h1.host, []))
            procs.append(newcomer)
            ready_at: list[float] = []
            threading.Thread(target=lambda: (newcomer.wait_ready(300), ready_at.append(time.time())), daemon=True).start()
            used = client.ask(cmd="first_use", peer=peer, allowed=[peer, servers["punched"][1].peer_id], timeout=180,
                              prompt=PROMPT)
            results["first_use_s"] = {"from_start": round(used["at"] - began, 2),
                                      "from_ready": round(used["at"] - ready_at[0], 2) if ready_at else None,
                                      **{k: used.get(k) for k in ("used", "attempts", "last_error", "last_route")}}
            print(json.dumps({"first_use_s": results["first_use_s"]}, indent=1), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if client is not None:
            client.close()
        if local is not None:
            local.stop()
        for proc in procs:
            proc.kill()
        topo.destroy()


if __name__ == "__main__":
    os.chdir(REPO)
    main()
