#!/usr/bin/env python
"""Speculative decoding over links with emulated latency: tokens/s of prompt lookup and of a draft model against
plain relayed generation, on the real SmolLM2-135M-Instruct (30 blocks) split over 3 servers.

    python bench/bench_speculative.py                          # 50 ms one-way per link, 64 new tokens, 2 reps
    python bench/bench_speculative.py --delay 0.05 --json bench/results/speculative.json

Every server sits behind a user-space proxy delaying each byte by ``--delay`` s each way (bench/latency_proxy.py,
as in bench_latency.py), so a relayed trip through the chain costs delay x (servers + 1). Greedy decoding, so each
mode must give exactly the plain tokens (checked). Tasks: ``edit`` (an input-grounded task: repeat a given text
with a word replaced, the case prompt lookup is for) and ``open`` (an open question, nothing to copy).

Modes (each run through the same client and swarm, alternating, ``--reps`` times):
  plain       one token per trip, relayed server to server (the baseline)
  lookup:K    transformers' prompt lookup, up to K candidates per trip
  draft-int8  a draft model on the client: SmolLM2 itself, every Linear dynamically quantized to int8
              (torch.ao quantize_dynamic). There is no smaller model with SmolLM2's tokenizer on this machine; in a
              real swarm the draft would be a small model of the same family (e.g. SmolLM2-135M drafting for
              SmolLM2-1.7B). This measures the mechanism with a draft that agrees often, not a realistic draft.
  draft-N     (--truncated-draft N) SmolLM2's first N blocks + its head as the draft: cheap, but it agrees on
              almost nothing (about 1%), so it is slower than plain; off by default.
Everything (3 servers, client, draft) shares this machine's 2 cores, so a draft's compute competes with the servers'.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench_latency import start_delayed_servers  # noqa: E402
from jupyter_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from jupyter_swarm.models.smollm2 import smollm2_path  # noqa: E402

TEXT = ("The honey bee is a social insect that lives in large colonies. Each colony has a single queen, thousands of "
        "female workers and, in summer, a few hundred male drones. Workers gather nectar and pollen from flowers, "
        "build the wax comb, feed the young and guard the entrance of the hive. In winter the bees cluster together "
        "and shiver their wing muscles to keep the queen warm.")
TASKS = {
    "edit": "Repeat the following text exactly, changing 'bee' to 'wasp' and 'bees' to 'wasps':\n\n" + TEXT,
    "open": "Why do honey bees dance?",
}


class _Clock:
    """A generate() streamer recording when tokens arrive and how many each time."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.arrivals.append((time.perf_counter(), value.numel()))

    def end(self) -> None:
        pass


def timed(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> tuple[dict, list[int]]:
    """Tokens/s of one greedy generate(): over the whole call, and after the first new token (decode only)."""
    clock = _Clock()
    began = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, streamer=clock, **kwargs)
    ended = time.perf_counter()
    made = out.shape[1] - prompt.shape[1]
    first_at = clock.arrivals[1][0]  # [0] is the prompt
    after_first = sum(n for _, n in clock.arrivals[2:])
    return dict(tokens=made, seconds=ended - began, tokens_per_s=made / (ended - began),
                decode_tokens_per_s=after_first / (clock.arrivals[-1][0] - first_at)), out[0].tolist()


def int8_copy(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.05, help="one-way delay per link, seconds")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--lookup", type=int, default=8, help="prompt lookup: candidates per trip")
    parser.add_argument("--truncated-draft", type=int, default=0, metavar="N",
                        help="also measure SmolLM2's first N blocks as the draft")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    drafts = {"draft-int8": int8_copy(local)}
    if args.truncated_draft:
        drafts[f"draft-{args.truncated_draft}"] = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, num_hidden_layers=args.truncated_draft).eval()
    modes = {"plain": {}, f"lookup:{args.lookup}": {"prompt_lookup_num_tokens": args.lookup},
             **{name: {"assistant_model": draft} for name, draft in drafts.items()}}
    blocks = local.config.num_hidden_layers
    cuts = [round(k * blocks / args.servers) for k in range(args.servers + 1)]
    proxies, servers = [], []
    runs: dict[str, dict[str, list[dict]]] = {task: {mode: [] for mode in modes} for task in args.tasks}
    try:
        peers = start_delayed_servers(path, cuts, args.delay, proxies, servers)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, wait_for_coverage=120)
        for task in args.tasks:
            messages = [{"role": "user", "content": TASKS[task]}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
            expected = local.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
            for rep in range(args.reps):
                for mode, kwargs in modes.items():
                    figures, tokens = timed(model, prompt, args.new_tokens, **kwargs)
                    assert tokens == expected, f"{mode}: the swarm's tokens differ from the local model's"
                    stats = model.speculation
                    if stats is not None:
                        figures.update(drafted=stats.drafted, accepted=stats.accepted, rounds=stats.rounds,
                                       acceptance_rate=stats.acceptance_rate)
                    runs[task][mode].append(figures)
                    print(task, rep, mode, json.dumps(figures), flush=True)
        model.close()
    finally:
        for server in servers:
            server.stop()
        for proxy in proxies:
            proxy.stop()
    summary: dict[str, dict] = {}
    for task, by_mode in runs.items():
        base = statistics.median(r["tokens_per_s"] for r in by_mode["plain"])
        summary[task] = {}
        for mode, rs in by_mode.items():
            rate = statistics.median(r["tokens_per_s"] for r in rs)
            entry = dict(tokens_per_s=rate, speedup_vs_plain=rate / base,
                         decode_tokens_per_s=statistics.median(r["decode_tokens_per_s"] for r in rs))
            if "acceptance_rate" in rs[0]:
                entry.update(acceptance_rate=sum(r["accepted"] for r in rs) / max(1, sum(r["drafted"] for r in rs)),
                             tokens_per_trip=statistics.median(r["tokens"] / r["rounds"] for r in rs))
            summary[task][mode] = entry
    report = dict(model="SmolLM2-135M-Instruct", servers=args.servers, spans=list(zip(cuts, cuts[1:])),
                  one_way_delay_s=args.delay, new_tokens=args.new_tokens, reps=args.reps, summary=summary, runs=runs)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
