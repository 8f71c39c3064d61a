"""The most any multi-process swarm could reach on this machine: the benchmark model split over worker processes
that pass hidden states through raw OS pipes (no libp2p, no encryption, no serialization, no event loop, no
threads), against transformers' local generate() in the same run.

Each worker holds one span (``BlockSpan``, the servers' own code) and its attention cache. A greedy step goes
client -> worker 1 -> ... -> worker N -> client, the order of a relayed swarm step, so it is N + 1 pipe messages of
raw float32 bytes. The client embeds, runs the final norm and LM head and takes the argmax itself. Tokens must equal
local generate()'s. Whatever separates this pipeline from local generation is the cost of splitting the model over
processes on this machine, which no transport can remove; ``bench_inference.py`` then shows what libp2p adds.

    python bench/bench_floor.py                  # 2 and 3 workers, 64 new tokens, 5 reps (~1 min)
    python bench/bench_floor.py --workers 2 --reps 9 --json bench/results/floor.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_inference import DEFAULT_CACHE, MODEL, PROMPT, bench_model, spans_for, timed_generate  # noqa: E402

_HEADER = struct.Struct("<II")  # tokens in this step, 0 = reset the cache; payload bytes


def _read_exactly(fd: int, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("pipe closed")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _send(fd: int, tokens: int, payload: bytes) -> None:
    os.write(fd, _HEADER.pack(tokens, len(payload)) + payload)


def _receive(fd: int) -> tuple[int, bytes]:
    tokens, size = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return tokens, _read_exactly(fd, size)


def worker(path: str, start: int, end: int, threads: int, read_fd: int, write_fd: int) -> None:
    """One span: read a step's hidden states, run the span with its cache, write the output on."""
    import torch

    from jupyter_swarm.models import BlockSpan

    torch.set_num_threads(threads)
    span = BlockSpan.load(path, start, end)
    cache = None
    with torch.inference_mode():
        while True:
            try:
                tokens, payload = _receive(read_fd)
            except EOFError:
                return
            if tokens == 0:
                cache = span.new_cache(1, 1024)
                _send(write_fd, 0, b"")
                continue
            hidden = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(1, tokens, span.hidden_size)
            out = span(hidden, cache=cache)
            _send(write_fd, tokens, out.numpy().tobytes())


class Pipeline:
    """Worker processes chained by pipes: client -> w1 -> ... -> wN -> client."""

    def __init__(self, path: str, spans: list[tuple[int, int]], threads: int):
        ctx = mp.get_context("fork")  # the workers inherit the pipes
        pipes = [os.pipe() for _ in range(len(spans) + 1)]  # pipes[i]: into worker i; pipes[-1]: back to the client
        self.processes = [ctx.Process(target=worker, args=(path, s, e, threads, pipes[i][0], pipes[i + 1][1]),
                                      daemon=True) for i, (s, e) in enumerate(spans)]
        for p in self.processes:
            p.start()
        self.to_first, self.from_last = pipes[0][1], pipes[-1][0]

    def reset(self) -> None:
        _send(self.to_first, 0, b"")
        _receive(self.from_last)

    def step(self, hidden: Any) -> Any:
        import torch

        _send(self.to_first, hidden.shape[1], hidden.numpy().tobytes())
        tokens, payload = _receive(self.from_last)
        return torch.frombuffer(bytearray(payload), dtype=torch.float32).view(1, tokens, hidden.shape[2])

    def close(self) -> None:
        os.close(self.to_first)
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def greedy(head: Any, run_blocks: Any, input_ids: Any, new_tokens: int) -> dict[str, Any]:
    """A bare greedy loop: embed, blocks, norm + LM head, argmax. Timed like bench_inference's timed_generate()."""
    import torch

    began = time.perf_counter()
    times, tokens = [], []
    with torch.inference_mode():
        step_ids = input_ids
        for _ in range(new_tokens):
            logits = head.logits(run_blocks(head.embed(step_ids)))
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            times.append(time.perf_counter())
            step_ids = torch.tensor([[token]])
    elapsed = time.perf_counter() - began
    return {"seconds": elapsed, "tokens_per_s": new_tokens / elapsed, "first_token_s": times[0] - began,
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process (1, as bench_inference)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from jupyter_swarm.models import BlockSpan
    from jupyter_swarm.models.head import ClientHead

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tag, path = bench_model(args.cache_dir)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    head = ClientHead.load(path)
    whole = BlockSpan.load(path, 0, MODEL["num_layers"])
    input_ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids[:, :args.prompt_tokens]
    print(f"model {tag}; batch 1, prompt {input_ids.shape[1]} tokens, {args.new_tokens} new tokens greedy; "
          f"{args.threads} torch thread(s) per process; cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}")

    def one_process() -> dict[str, Any]:
        cache = whole.new_cache(1, 1024)
        return greedy(head, lambda h: whole(h, cache=cache), input_ids, args.new_tokens)

    results: dict[str, Any] = {"model": MODEL, "settings": vars(args), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}, "pipelines": []}
    ok = True
    for n in args.workers:
        spans = spans_for(n, MODEL["num_layers"])
        pipeline = Pipeline(path, spans, args.threads)
        try:
            def piped() -> dict[str, Any]:
                pipeline.reset()
                return greedy(head, pipeline.step, input_ids, args.new_tokens)

            sides = {"local generate()": lambda: timed_generate(local, input_ids, args.new_tokens),
                     "one process": one_process, f"{n} processes": piped}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
            for rep in range(args.warmup + args.reps):
                order = list(sides)[rep % 3:] + list(sides)[:rep % 3]
                for name in order:
                    result = sides[name]()
                    if rep >= args.warmup:
                        runs[name].append(result)
        finally:
            pipeline.close()
        base = statistics.median(r["tokens_per_s"] for r in runs["local generate()"])
        print(f"\n== {n} worker processes, spans {' '.join(f'{s}:{e}' for s, e in spans)} ==")
        entry: dict[str, Any] = {"workers": n, "spans": spans, "sides": {}}
        expected = runs["local generate()"][0]["tokens"]
        for name, side_runs in runs.items():
            tps = statistics.median(r["tokens_per_s"] for r in side_runs)
            same = all(r["tokens"] == expected for r in side_runs)
            ok &= same
            print(f"  {name:17s} {tps:6.1f} tok/s   ratio to local generate() {tps / base:.3f}   "
                  f"tokens {'match' if same else 'DIFFER'}")
            entry["sides"][name] = {"tokens_per_s": tps, "ratio": tps / base, "tokens_match": same,
                                    "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in side_runs]}
        results["pipelines"].append(entry)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if not ok:
        print("FAILED: tokens differ from local generate()", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
