#!/usr/bin/env python
"""Greedy generation speed through loopback swarms of 2 and 3 servers, against local generation on the same weights.

    python bench/bench_inference.py                       # 2- and 3-server swarms, 64 new tokens, 5 reps
    python bench/bench_inference.py --servers 2 --reps 9 --json bench/results/inference.json
    python bench/bench_inference.py --profile             # also break the per-token time down (client + servers)

For each swarm size the script starts `jupyter-swarm serve` subprocesses on loopback (blocks split evenly), connects
an AutoDistributedModelForCausalLM, warms both models up, then alternates local and swarm generate() calls (the
machine is shared and noisy, so both sides see the same conditions) and reports median tokens/s and swarm/local.
The swarm's tokens are checked against the local model's (greedy, float32: they must be identical).

Tokens/s is end to end: new tokens / wall time of one generate() call, which includes the prompt's forward pass
and, for the swarm, opening the inference session on every server. The "decode" rate leaves out the first token.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / "results" / "models"

#: the benchmark model: Llama-shaped, ~26.4M float32 parameters. intermediate_size=1376 is Llama's MLP ratio
#: (~2.69 x hidden, as 11008/4096); make_tiny_model's default (2 x hidden = 1024) would give ~22.0M.
MODEL = dict(family="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, vocab_size=4096,
             intermediate_size=1376, seed=0)
PROMPT = "Once upon a time there was a little model that lived in a notebook."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per generate() call")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length (batch 1)")
    p.add_argument("--reps", type=int, default=5, help="measured generate() calls per side and swarm size")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured generate() calls per side first")
    p.add_argument("--servers", type=int, nargs="+", default=[2, 3], help="swarm sizes to measure")
    p.add_argument("--client-threads", type=int, default=1,
                   help="torch threads of this process (local baseline and the swarm client alike); 0 = torch's "
                        "default")
    p.add_argument("--server-threads", type=int, default=1,
                   help="--torch-threads of every server; 0 = do not pass it (torch's default)")
    p.add_argument("--update-period", type=float, default=30.0, help="--update-period of every server")
    p.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="environment variables for this process and every server, e.g. PY_YAMUX_RELEASE_ON_READ=0")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the benchmark model is made (once)")
    p.add_argument("--client-driven", action="store_true",
                   help="also measure the swarm with the client sending every step to every server "
                        "(model.swarm.push = False) as a third side; --profile implies it")
    p.add_argument("--profile", action="store_true",
                   help="time every step on the client and the servers and print where the per-token time goes")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.reps < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        p.error("need --reps >= 1, --new-tokens >= 2, --prompt-tokens >= 1")
    if any(not 1 <= n <= MODEL["num_layers"] for n in args.servers):
        p.error(f"--servers must be in 1..{MODEL['num_layers']}")
    if any("=" not in item for item in args.env):
        p.error("--env takes KEY=VALUE items")
    args.env = dict(item.split("=", 1) for item in args.env)
    return args


def bench_model(cache_dir: str) -> tuple[str, str]:
    """(tag, directory) of the benchmark model, made once under ``cache_dir``."""
    from jupyter_swarm.models import make_tiny_model

    tag = "llama-h{hidden_size}-l{num_layers}-i{intermediate_size}-v{vocab_size}-s{seed}".format(**MODEL)
    return tag, make_tiny_model(os.path.join(cache_dir, tag), **MODEL)


def spans_for(num_servers: int, num_blocks: int) -> list[tuple[int, int]]:
    """Consecutive spans, as even as possible, larger ones first: 2 -> (0,4),(4,8); 3 -> (0,3),(3,6),(6,8)."""
    size = math.ceil(num_blocks / num_servers)
    spans, start = [], 0
    for i in range(num_servers):
        end = min(num_blocks, start + size) if i < num_servers - 1 else num_blocks
        spans.append((start, end))
        start = end
    if any(s >= e for s, e in spans):
        raise SystemExit(f"cannot split {num_blocks} blocks into {num_servers} non-empty spans")
    return spans


class TokenTimes:
    """A generate() streamer that notes when each new token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def timed_generate(model: Any, input_ids: Any, new_tokens: int) -> dict[str, Any]:
    import torch

    streamer = TokenTimes()
    began = time.perf_counter()
    with torch.inference_mode():
        # min_new_tokens: a random model may emit </s>; every call must produce exactly new_tokens tokens
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=streamer)
    elapsed = time.perf_counter() - began
    tokens = out[0, input_ids.shape[1]:].tolist()
    assert len(tokens) == new_tokens, f"generated {len(tokens)} tokens, expected {new_tokens}"
    times = streamer.times
    return {"seconds": elapsed, "tokens_per_s": new_tokens / elapsed, "first_token_s": times[0] - began,
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": tokens}


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt_rates(runs: list[dict[str, Any]], key: str = "tokens_per_s") -> str:
    values = [r[key] for r in runs]
    return f"median {median(values):6.1f}  (min {min(values):.1f}, max {max(values):.1f})"


def report(num_servers: int, spans: list[tuple[int, int]], routes: list[str], runs: dict[str, list[dict[str, Any]]],
           cpu: dict[str, dict[str, float]], new_tokens: int) -> dict[str, Any]:
    """Print one swarm size's results (local vs each swarm side) and return them for the JSON file."""
    local_runs = runs["local"]
    local_tps = median([r["tokens_per_s"] for r in local_runs])
    local_dec = median([r["decode_tokens_per_s"] for r in local_runs])
    tokens_made = new_tokens * len(local_runs)
    local_cpu_ms = 1000 * sum(v for k, v in cpu["local"].items() if k.startswith("client/")) / tokens_made
    first = 1000 * median([r["first_token_s"] for r in local_runs])
    print(f"local  tokens/s {fmt_rates(local_runs)}   first token {first:.1f} ms   CPU {local_cpu_ms:.2f} ms/token")
    entry: dict[str, Any] = {
        "servers": num_servers, "spans": spans, "online_spans": routes, "local_tokens_per_s": local_tps,
        "local_decode_tokens_per_s": local_dec, "local_cpu_ms_per_token": local_cpu_ms,
        "local_runs": [{k: v for k, v in r.items() if k != "tokens"} for r in local_runs], "sides": {}}
    for side in (s for s in runs if s != "local"):
        side_runs = runs[side]
        tps = median([r["tokens_per_s"] for r in side_runs])
        dec = median([r["decode_tokens_per_s"] for r in side_runs])
        # the sides alternate, so each rep's local and swarm calls saw about the same machine load
        paired = median([x["tokens_per_s"] / l["tokens_per_s"] for l, x in zip(local_runs, side_runs)])
        cpu_ms = 1000 * sum(cpu[side].values()) / tokens_made
        cpu_ratio = local_cpu_ms / cpu_ms if cpu_ms > 0 else float("nan")
        first = 1000 * median([r["first_token_s"] for r in side_runs])
        print(f"{side:13s}  tokens/s {fmt_rates(side_runs)}   first token {first:.1f} ms   CPU {cpu_ms:.2f} ms/token "
              "(client + servers)")
        print(f"  ratio {side}/local: {tps / local_tps:.3f} end to end (median of per-rep ratios {paired:.3f}), "
              f"{dec / local_dec:.3f} decode only; by CPU per token {cpu_ratio:.3f}")
        if side == "swarm":
            steps = [r.get("relayed_steps", 0) for r in side_runs]
            print(f"  steps relayed server to server per call: {min(steps)}..{max(steps)} (of {new_tokens})")
        entry["sides"][side] = {
            "tokens_per_s": tps, "decode_tokens_per_s": dec, "ratio": tps / local_tps, "paired_ratio": paired,
            "decode_ratio": dec / local_dec, "cpu_ms_per_token": cpu_ms, "cpu_ratio": cpu_ratio,
            "cpu_ms_per_token_by_thread": {k: 1000 * v / tokens_made for k, v in sorted(cpu[side].items())},
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in side_runs]}
    print("  (CPU ratio: a swarm step keeps one process busy at a time, so local CPU/token over the swarm's summed "
          "CPU/token\n   estimates the ratio on an idle machine; other people's load moves it much less)")
    spread = max(r["tokens_per_s"] for r in local_runs) / min(r["tokens_per_s"] for r in local_runs)
    busy = os.getloadavg()[0]
    entry.update(local_spread=spread, load_average=busy)
    if spread > 1.25 or busy > 0.75 * (os.cpu_count() or 1):
        print(f"WARNING: the machine is busy (load average {busy:.2f} on {os.cpu_count()} cpus, local tokens/s "
              f"varied {spread:.2f}x): wall-clock ratios of this run are unreliable; trust the CPU ratio or run "
              "again when the machine is quieter")
    reference = local_runs[0]["tokens"]
    every = [(side, r) for side in runs for r in runs[side]]
    bad = [(side, r) for side, r in every if r["tokens"] != reference]
    entry.update(tokens_match=not bad, tokens=reference)
    if not bad:
        print(f"tokens: all {len(every)} calls ({', '.join(runs)}) gave the same {new_tokens} tokens")
    else:
        side, r = bad[0]
        pos = next(i for i, (a, b) in enumerate(zip(reference, r["tokens"])) if a != b)
        print(f"TOKENS DIFFER: {len(bad)} of {len(every)} calls differ from the first local one "
              f"(first: a {side} call, at token {pos})")
    # flat keys of the client-driven swarm, for quick reading of the JSON
    main_side = entry["sides"]["swarm"]
    entry.update(swarm_tokens_per_s=main_side["tokens_per_s"], ratio=main_side["ratio"],
                 paired_ratio=main_side["paired_ratio"], decode_ratio=main_side["decode_ratio"],
                 cpu_ratio=main_side["cpu_ratio"])
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(args.env)  # before torch and libp2p are imported; servers get them through LocalSwarm
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.local_swarm import LocalSwarm

    sys.path.insert(0, str(BENCH_DIR))
    from profile_hooks import cpu_delta, thread_cpu

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.client_threads:
        torch.set_num_threads(args.client_threads)
    tag, path = bench_model(args.cache_dir)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    num_params = sum(p.numel() for p in local.parameters())
    tokenizer = AutoTokenizer.from_pretrained(path)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :args.prompt_tokens]
    if input_ids.shape[1] < args.prompt_tokens:
        raise SystemExit(f"the built-in prompt has only {input_ids.shape[1]} tokens; use --prompt-tokens <= that")

    server_args = ["--update-period", str(args.update_period)]
    if args.server_threads:
        server_args += ["--torch-threads", str(args.server_threads)]
    print(f"model: {tag}, {num_params / 1e6:.1f}M params float32, in {path}")
    print(f"batch 1, prompt {input_ids.shape[1]} tokens, {args.new_tokens} new tokens greedy; "
          f"{args.warmup} warm-up + {args.reps} measured calls per side, local and swarm alternating")
    print(f"threads: this process (local and swarm client) {torch.get_num_threads()}, "
          f"servers {args.server_threads or 'torch default'}; cpus {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.env:
        print(f"environment (this process and servers): {' '.join(f'{k}={v}' for k, v in args.env.items())}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
          flush=True)

    profile = None
    profile_dir = None
    env: dict[str, str] = dict(args.env)
    if args.profile:
        from profile_hooks import ClientProfile, install_client_hooks

        profile = ClientProfile()
        missing = install_client_hooks(profile, local)
        if missing:
            print(f"WARNING: --profile found no {', '.join(missing)} in the package; client timings are off")
        profile_dir = tempfile.mkdtemp(prefix="bench-profile-")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR / "server_hook"),
                                                          os.environ.get("PYTHONPATH")]))

    results: dict[str, Any] = {
        "model": {**MODEL, "path": path, "params": num_params, "dtype": "float32"},
        "settings": {"new_tokens": args.new_tokens, "prompt_tokens": int(input_ids.shape[1]), "reps": args.reps,
                     "warmup": args.warmup, "client_threads": torch.get_num_threads(),
                     "server_threads": args.server_threads or None, "update_period": args.update_period,
                     "env": args.env},
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "swarms": [],
    }
    client_driven = args.client_driven or args.profile
    sides = ["local", "swarm"] + (["client-driven"] if client_driven else [])
    relay_counter: dict[str, int] = {}
    from jupyter_swarm.client.inference import InferenceSession

    if hasattr(InferenceSession, "_relay_step"):  # count the steps that really went server to server
        original_relay_step = InferenceSession._relay_step

        async def counted_relay_step(self: Any, *a: Any, **k: Any) -> Any:
            relay_counter["steps"] = relay_counter.get("steps", 0) + 1
            return await original_relay_step(self, *a, **k)

        InferenceSession._relay_step = counted_relay_step
    all_match = True
    for num_servers in args.servers:
        spans = spans_for(num_servers, MODEL["num_layers"])
        print(f"\n== {num_servers} servers, spans {' '.join(f'{s}:{e}' for s, e in spans)} ==", flush=True)
        began = time.perf_counter()
        run_env = dict(env)
        if profile_dir:
            run_env["JUPYTER_SWARM_BENCH_PROFILE"] = os.path.join(profile_dir, f"servers{num_servers}")
        with LocalSwarm(path, spans, extra_args=server_args, env=run_env or None) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            targets = {"local": local, "swarm": model, "client-driven": model}

            def run(side: str) -> dict[str, Any]:
                model.swarm.push = side != "client-driven"
                relay_counter.clear()
                if profile:
                    profile.enabled = side == "client-driven"  # the per-span breakdown needs a reply per span
                began_wall = time.time()
                try:
                    result = timed_generate(targets[side], input_ids, args.new_tokens)
                finally:
                    model.swarm.push = True
                if side == "client-driven":
                    swarm_windows.append((began_wall, time.time()))
                if side == "swarm":
                    result["relayed_steps"] = relay_counter.get("steps", 0)
                return result

            try:
                print(f"swarm up and client connected in {time.perf_counter() - began:.1f} s", flush=True)
                swarm_windows: list[tuple[float, float]] = []  # wall-clock spans of the client-driven calls
                for _ in range(args.warmup):
                    for side in sides:
                        run(side)
                if profile:
                    profile.reset()
                swarm_windows.clear()
                runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
                pids = {"client": os.getpid(), **{f"server{s.start_block}:{s.end_block}": s.process.pid
                                                  for s in swarm.servers}}
                cpu: dict[str, dict[str, float]] = {side: {} for side in sides}  # CPU seconds by process/thread
                for rep in range(args.reps):
                    order = sides[rep % len(sides):] + sides[:rep % len(sides)]  # no fixed first mover
                    for side in order:
                        cpu_before = thread_cpu(pids)
                        runs[side].append(run(side))
                        for k, v in cpu_delta(cpu_before, thread_cpu(pids)).items():
                            cpu[side][k] = cpu[side].get(k, 0.0) + v
                    print(f"  rep {rep + 1}/{args.reps}: " + ", ".join(
                        f"{side} {runs[side][-1]['tokens_per_s']:6.1f} tok/s" for side in sides), flush=True)
                routes = [f"{r.start}:{r.end}" for r in model.swarm.read_map().online()]
            finally:
                model.close()
        server_files = sorted(glob.glob(os.path.join(profile_dir, f"servers{num_servers}.*.json"))) \
            if profile_dir else []
        entry = report(num_servers, spans, routes, runs, cpu, args.new_tokens)
        all_match &= entry["tokens_match"]
        if profile:
            from profile_summary import summarize

            entry["profile"] = summarize(profile, server_files, swarm_windows, num_servers, args.new_tokens,
                                         runs["local"], runs["client-driven"], cpu["client-driven"])
        results["swarms"].append(entry)

    if profile_dir:
        shutil.rmtree(profile_dir, ignore_errors=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["tokens_match"] = all_match
    print("\n== summary (median tokens/s, end to end) ==")
    for e in results["swarms"]:
        for side in ("swarm", "client-driven"):
            if side in e["sides"]:
                x = e["sides"][side]
                print(f"{e['servers']} servers, {side:13s}: local {e['local_tokens_per_s']:6.1f}  {side} "
                      f"{x['tokens_per_s']:6.1f}  ratio {x['ratio']:.3f}  (paired {x['paired_ratio']:.3f}, decode "
                      f"only {x['decode_ratio']:.3f}, CPU {x['cpu_ratio']:.3f})  "
                      f"tokens {'match' if e['tokens_match'] else 'DIFFER'}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cpus)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if not all_match:
        print("FAILED: the swarm's tokens differ from local generation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
