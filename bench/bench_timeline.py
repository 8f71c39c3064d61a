"""Where one relayed decode step's wall time goes, hop by hop, across the client and every server process.

Starts a loopback swarm of the benchmark model (as bench_inference.py), generates greedily with timestamps on
every frame received and sent and on each server's compute (timeline_hooks.py; one clock for all processes), and
prints the median of each segment of the critical path of a token:

    client step -> trio thread -> send -> [transport -> server: receive -> compute -> send] x N -> transport
    -> client trio thread -> main thread -> embed, LM head and generate() until the next step

    python bench/bench_timeline.py                  # 2 servers, 10 x 64 tokens (~40 s)
    python bench/bench_timeline.py --servers 3 --json bench/results/timeline3.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_inference import DEFAULT_CACHE, MODEL, bench_model, spans_for  # noqa: E402

Events = list[tuple[str, float]]


def first(events: Events, name: str, after: float, before: float) -> float | None:
    for event, t in events:
        if event == name and after <= t <= before:
            return t
    return None


def segments(client: Events, servers: list[Events]) -> dict[str, list[float]]:
    """Milliseconds of each segment, per decode step (client events from step0 to step1, servers in chain order)."""
    out: dict[str, list[float]] = {}

    def add(name: str, seconds: float | None) -> None:
        if seconds is not None and seconds >= 0:
            out.setdefault(name, []).append(1000 * seconds)

    starts = [i for i, (e, _) in enumerate(client) if e == "step0"]
    for n, i in enumerate(starts):
        end = next((j for j in range(i, len(client)) if client[j][0] == "step1"), None)
        if end is None:
            break
        window = client[i:end + 1]
        t_step0, t_step1 = window[0][1], window[-1][1]
        names = [e for e, _ in window]
        if names.count("send1") != 1:  # a prefill or failover step, or a client-driven one: not a relayed step
            continue
        t_astep0 = first(window, "astep0", t_step0, t_step1)
        t_send0, t_send1 = first(window, "send0", t_step0, t_step1), first(window, "send1", t_step0, t_step1)
        t_recv = max(t for e, t in window if e == "recv")
        t_astep1 = max(t for e, t in window if e == "astep1")
        hops, t = [], t_send1
        for events in servers:
            received = first(events, "recv", t, t_step1)
            c0 = first(events, "c0", received or t, t_step1)
            c1 = first(events, "c1", c0 or t, t_step1)
            s0 = first(events, "send0", c1 or t, t_step1)
            s1 = first(events, "send1", s0 or t, t_step1)
            if None in (received, c0, c1, s0, s1):
                break
            hops.append((received, c0, c1, s0, s1))
            t = s1
        if len(hops) != len(servers):
            continue
        add("client: main -> trio thread", t_astep0 - t_step0)
        add("client: encode", t_send0 - t_astep0)
        add("client: send", t_send1 - t_send0)
        previous = t_send1
        for k, (received, c0, c1, s0, s1) in enumerate(hops, 1):
            add(f"transport to server {k}", received - previous)
            add(f"server {k}: received -> compute", c0 - received)
            add(f"server {k}: compute", c1 - c0)
            add(f"server {k}: compute -> send", s0 - c1)
            add(f"server {k}: send", s1 - s0)
            previous = s1
        add("transport to client", t_recv - previous)
        add("client: decode, keep inputs", t_astep1 - t_recv)
        add("client: trio thread -> main", t_step1 - t_astep1)
        if n + 1 < len(starts):
            add("client: embed, LM head, generate() loop", client[starts[n + 1]][1] - t_step1)
            add("TOTAL per token", client[starts[n + 1]][1] - t_step0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--calls", type=int, default=10, help="measured generate() calls of --new-tokens tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="write the per-segment medians here")
    args = p.parse_args(argv)

    import torch

    import timeline_hooks
    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.local_swarm import LocalSwarm

    torch.set_num_threads(1)
    _, path = bench_model(args.cache_dir)
    out_dir = tempfile.mkdtemp(prefix="bench-timeline-")
    env = {"JUPYTER_SWARM_BENCH_TIMELINE": os.path.join(out_dir, "server"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR / "server_hook"), os.environ.get("PYTHONPATH")]))}
    client: Events = []
    timeline_hooks.install_client_hooks(client)
    spans = spans_for(args.servers, MODEL["num_layers"])
    input_ids = torch.randint(0, MODEL["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    with LocalSwarm(path, spans, extra_args=["--torch-threads", "1"], env=env) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        pids = [s.process.pid for s in swarm.servers]  # in span order: the chain's order
        try:
            for _ in range(2):
                model.generate(input_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            client.clear()
            began = time.perf_counter()
            for _ in range(args.calls):
                model.generate(input_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            rate = args.calls * args.new_tokens / (time.perf_counter() - began)
        finally:
            model.close()
    servers = []
    for pid in pids:
        (file,) = glob.glob(os.path.join(out_dir, f"server.{pid}.json"))
        with open(file, encoding="utf-8") as f:
            servers.append([tuple(e) for e in json.load(f)])
    parts = segments(client, servers)
    medians = {name: statistics.median(values) for name, values in parts.items()}
    print(f"{args.servers} servers, spans {' '.join(f'{s}:{e}' for s, e in spans)}; {rate:.1f} tok/s with the "
          f"timestamps on; {len(parts.get('TOTAL per token', []))} relayed decode steps; median ms:")
    for name, value in medians.items():
        if name != "TOTAL per token":
            print(f"  {name:42s} {value:7.3f}")
    overhead = sum(v for k, v in medians.items()
                   if not k.endswith(": compute") and not k.startswith("client: embed") and k != "TOTAL per token")
    print(f"  {'sum of the medians above':42s} {sum(v for k, v in medians.items() if k != 'TOTAL per token'):7.3f}")
    print(f"  {'TOTAL per token':42s} {medians.get('TOTAL per token', float('nan')):7.3f}")
    print(f"  messaging and hand-offs (all but compute, embed, LM head and generate()): {overhead:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"servers": args.servers, "spans": spans, "tokens_per_s": rate, "median_ms": medians}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
