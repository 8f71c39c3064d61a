#!/usr/bin/env python
"""What verified outputs cost: greedy generation tokens/s with ``verify=p`` against ``verify=0`` in the same run.

    python bench/bench_verify.py                                # p in 0.01 0.05 0.2 1, 64 new tokens, 5 reps
    python bench/bench_verify.py --probabilities 0.01 1 --reps 9 --client-driven

Starts two `jupyter-swarm serve` subprocesses per half of the benchmark model (bench_inference.py's, 8 blocks), so
every span has a second server to verify on; one client alternates generate() calls over every p (the machine is
shared and noisy, so each p sees the same conditions) and reports median tokens/s, its ratio to p=0, and how many
span steps were re-run. Tokens are checked against p=0's (greedy, float32: identical). See bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_inference import DEFAULT_CACHE, bench_model  # noqa: E402
from jupyter_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from jupyter_swarm.local_swarm import LocalSwarm  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probabilities", type=float, nargs="+", default=[0.01, 0.05, 0.2, 1.0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--client-driven", action="store_true", help="no server-to-server relaying")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tag, path = bench_model(args.cache_dir)
    spans = [(0, 4), (0, 4), (4, 8), (4, 8)]
    probabilities = [0.0, *args.probabilities]
    prompt = torch.randint(5, 4000, (1, 8), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="bench-verify-"), \
            LocalSwarm(path, spans, extra_args=["--torch-threads", "1", "--update-period", "30",
                                                "--throughput", "10", "--balance-period", "0"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, verify=0.0)
        model.swarm.push = not args.client_driven
        rates: dict[float, list[float]] = {p: [] for p in probabilities}
        checked: dict[float, int] = {p: 0 for p in probabilities}
        reference = None
        try:
            for rep in range(args.warmup + args.reps):
                for p in probabilities:
                    model.verify = p
                    before = model.swarm.verifier.stats.checked
                    began = time.perf_counter()
                    out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
                    seconds = time.perf_counter() - began
                    reference = out if reference is None else reference
                    if out.tolist() != reference.tolist():
                        print(f"MISMATCH at verify={p}", flush=True)
                        return 1
                    if rep >= args.warmup:
                        rates[p].append(args.new_tokens / seconds)
                        checked[p] += model.swarm.verifier.stats.checked - before
            stats = model.swarm.verifier.stats
        finally:
            model.close()
    base = statistics.median(rates[0.0])
    mode = "client-driven" if args.client_driven else "relayed"
    print(f"model {tag}, 2 servers per span of 4 blocks, {mode}, {args.new_tokens} new tokens, {args.reps} reps")
    print(f"{'verify':>8} {'tokens/s':>9} {'vs p=0':>7} {'span steps re-run':>18}")
    for p in probabilities:
        rate = statistics.median(rates[p])
        print(f"{p:>8g} {rate:>9.1f} {rate / base:>7.3f} {checked[p] / args.reps:>18.1f}")
    print(f"mismatches {stats.mismatches}, checks skipped {stats.skipped}; tokens identical at every p")
    return 0


if __name__ == "__main__":
    sys.exit(main())
