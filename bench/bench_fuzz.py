#!/usr/bin/env python
"""Fuzzing at full count: 10^5 generated messages across every protocol against two live servers (separate
processes) while two honest clients generate, the same check as tests/integration/test_fuzz.py (which sends 10^4).

    python bench/bench_fuzz.py                      # 100,000 messages (~15-25 min on 2 cores)
    python bench/bench_fuzz.py --messages 20000     # fewer

The servers serve the integration tests' tiny Llama (4 blocks, hidden 64) as two spans. The fuzzer
(``tests/integration/wire_fuzz.py``) makes valid messages through the typed wire classes and breaks most of them
(fields dropped, retyped or pushed to extremes, tensor headers and bytes altered, types swapped, packed bytes
flipped, cut or replaced). It passes when: every message got an answer or a closed stream, no answer was the
catch-all "server error" of a bug, both servers are alive with no traceback in their logs, and every honest
generation gave the local model's tokens. Exit status 0 only then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_LLAMA = dict(family="llama", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, seed=3)  # the tests'
PROMPTS = [[1, 17, 42, 99, 7], [4, 5, 8, 13, 21, 34]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.client.swarm import join_swarm
    from jupyter_swarm.local_swarm import LocalSwarm
    from jupyter_swarm.models import make_tiny_model
    from tests.integration.wire_fuzz import WireFuzzer, fuzz_servers

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        path = make_tiny_model(os.path.join(tmp, "llama"), **TINY_LLAMA)
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        prompts = [torch.tensor([p]) for p in PROMPTS]
        expected = [local.generate(p, max_new_tokens=8, do_sample=False).tolist() for p in prompts]
        server_args = ["--torch-threads", "1", "--update-period", "2"]
        with LocalSwarm(path, [(0, 2), (2, 4)], extra_args=server_args) as swarm:
            honest = [AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
                      for _ in prompts]
            done = threading.Event()
            results: list[tuple[int, list]] = []
            errors: list[str] = []

            def generate_until_done(k: int) -> None:
                try:
                    while not done.is_set():
                        results.append((k, honest[k].generate(prompts[k], max_new_tokens=8,
                                                              do_sample=False).tolist()))
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(repr(e))

            threads = [threading.Thread(target=generate_until_done, args=(k,)) for k in range(len(prompts))]
            for thread in threads:
                thread.start()
            node = join_swarm(swarm.initial_peers)
            started = time.monotonic()
            try:
                report = node.call(fuzz_servers, node, [s.peer_id for s in swarm.servers],
                                   WireFuzzer(args.seed, TINY_LLAMA["hidden_size"]), args.messages)
            finally:
                seconds = time.monotonic() - started
                done.set()
                node.shutdown()
                for thread in threads:
                    thread.join(120)
                for model in honest:
                    model.close()
            alive = all(s.process.poll() is None for s in swarm.servers)
            tracebacks = sum("Traceback" in line for s in swarm.servers for line in s.output)
    same = bool(results) and all(tokens == expected[k] for k, tokens in results)
    print(f"{report.total} fuzzed messages in {seconds:.0f} s ({report.total / seconds:.0f}/s): sent "
          f"{json.dumps(dict(report.sent), sort_keys=True)}")
    print(f"answers: {json.dumps(dict(report.answers), sort_keys=True)}")
    print(f"bugs (\"server error\" replies): {len(report.bugs)} {report.bugs[:3]}")
    print(f"servers alive: {alive}; tracebacks in their logs: {tracebacks}")
    print(f"honest generations: {len(results)} ({sum(k == 0 for k, _ in results)} + "
          f"{sum(k == 1 for k, _ in results)}), all with the local tokens: {same}; errors: {errors}")
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    ok = report.total == args.messages and not report.bugs and alive and not tracebacks and same and not errors
    if args.json:
        Path(args.json).write_text(json.dumps({"messages": report.total, "seconds": seconds, "sent": report.sent,
                                               "answers": report.answers, "bugs": report.bugs[:20],
                                               "servers_alive": alive, "tracebacks": tracebacks,
                                               "honest_generations": len(results), "same_tokens": same,
                                               "errors": errors, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
