#!/usr/bin/env python
"""Memory per block, tokens/s and perplexity of a model's blocks per quant type (none, int8, nf4, fp4), on CPU or GPU.

    python bench/bench_quant.py                              # SmolLM2-135M-Instruct, this machine's device
    python bench/bench_quant.py --reps 5 --json bench/results/quant.json
    python bench/bench_quant.py --device cuda --dtypes float32 float16      # the GPU table (the default on CUDA)

Every configuration runs the blocks through the same code a server runs (``BlockSpan.load(..., quant_type=...)``)
with the client's embeddings and LM head in front and behind, in one process:

* memory: the bytes each block's tensors take (exact, bitsandbytes' scales included) and what the server's sizing
  predicts; and the peak memory allocated while loading the whole model's blocks, in a fresh subprocess per
  configuration (GPU: torch's peak allocation; CPU: the peak of anonymous resident memory, RssAnon, sampled every
  millisecond, since float weights that stay as read are pages of the mapped checkpoint file, not allocations).
  A quantized load peaking near its quantized size, far below the float span's size, shows that each block is
  quantized before the next one is read;
* speed: greedy decoding (batch 1, one token per step, with the blocks' cache) and a 128-token forward, in tokens/s;
  configurations alternate within each rep (the machine is shared and noisy) and are reported as medians and as
  ratios to ``none`` in the same dtype;
* accuracy: perplexity on tests/data/perplexity.txt (a fresh text, so no model has memorised it), and the largest
  logit difference from ``none``.

It runs unchanged on a GPU: ``--device`` defaults to cuda when one is visible, and the dtypes then default to
float32 and float16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
TEXT = BENCH_DIR.parent / "tests" / "data" / "perplexity.txt"
QUANT_TYPES = ("none", "int8", "nf4", "fp4")
PROMPT = "The tide comes in twice a day because"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU, float32 float16 on CUDA")
    p.add_argument("--quant-types", nargs="+", default=list(QUANT_TYPES), choices=QUANT_TYPES)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decoding run")
    p.add_argument("--forward-tokens", type=int, default=128, help="tokens of the batched forward")
    p.add_argument("--reps", type=int, default=3, help="measured runs per configuration (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--load-only", nargs=2, metavar=("DTYPE", "QUANT_TYPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from jupyter_swarm.models.smollm2 import smollm2_path

    return smollm2_path()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory: one fresh process per configuration ------------------------------------------------------------
def resident_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The largest value of ``RssAnon`` while it runs, sampled every millisecond by a thread."""

    def __init__(self) -> None:
        self.peak = resident_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident_bytes("RssAnon"))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes("RssAnon"))


def load_only(path: str, device: torch.device, dtype: torch.dtype, quant_type: str) -> dict[str, Any]:
    """Load every block once and report load time, bytes held and the peak memory of loading."""
    from jupyter_swarm.models import BlockSpan, load_model_config
    from jupyter_swarm.models.quantization import QuantType, check_device_runs, measured_bytes
    from jupyter_swarm.runtime.server import block_bytes, num_blocks_of

    config = load_model_config(path)
    blocks = num_blocks_of(config)
    check_device_runs(QuantType(quant_type), device, dtype)  # imports bitsandbytes and warms its kernels up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_bytes("RssAnon")
    with PeakSampler() as sampler:
        began = time.perf_counter()
        span = BlockSpan.load(path, 0, blocks, dtype=dtype, device=device, quant_type=quant_type)
        sync(device)
        seconds = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.peak) - before
    return {"load_s": seconds, "blocks": blocks, "block_bytes": measured_bytes(span.blocks) / blocks,
            "predicted_block_bytes": block_bytes(config, dtype, QuantType(quant_type)), "peak_load_bytes": peak}


def measure_memory(args: argparse.Namespace, path: str, dtype_name: str, quant_type: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--model", path, "--device", str(args.device), "--threads",
               str(args.threads), "--load-only", dtype_name, quant_type]
    # glibc keeps freed heap memory resident once its mmap threshold has grown; a fixed threshold makes big blocks
    # go back to the system when freed, so the resident peak is what was alive at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- speed and accuracy: every configuration in this process ----------------------------------------------------
class Configuration:
    """One (dtype, quant type): the blocks as a server loads them, and the client's head."""

    def __init__(self, path: str, head: Any, device: torch.device, dtype: torch.dtype, quant_type: str):
        from jupyter_swarm.models import BlockSpan

        self.name = f"{str(dtype).removeprefix('torch.')}/{quant_type}"
        self.head, self.device, self.dtype = head, device, dtype
        self.span = BlockSpan.load(path, 0, head.num_blocks, dtype=dtype, device=device, quant_type=quant_type)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.head.embed(input_ids.to(self.device)).to(self.dtype)
        return self.head.logits(self.span(hidden).float()).float()

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens after ``input_ids`` (one step per token, with a cache) and the decoding tokens/s."""
        cache = self.span.new_cache(1, input_ids.shape[1] + new_tokens)
        hidden = self.span(self.head.embed(input_ids.to(self.device)).to(self.dtype), cache=cache)
        token = self.head.logits(hidden[:, -1:].float()).argmax(-1)
        tokens = [int(token)]
        sync(self.device)
        began = time.perf_counter()
        for _ in range(new_tokens - 1):
            hidden = self.span(self.head.embed(token).to(self.dtype), cache=cache)
            token = self.head.logits(hidden.float()).argmax(-1)
            tokens.append(int(token))
        sync(self.device)
        return tokens, (new_tokens - 1) / (time.perf_counter() - began)

    @torch.inference_mode()
    def forward_rate(self, input_ids: torch.Tensor) -> float:
        sync(self.device)
        began = time.perf_counter()
        self.span(self.head.embed(input_ids.to(self.device)).to(self.dtype))
        sync(self.device)
        return input_ids.shape[1] / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = args.dtypes or (["float32", "float16"] if args.device.type == "cuda" else ["float32"])
    path = model_path(args)
    if args.load_only:
        dtype_name, quant_type = args.load_only
        print(json.dumps(load_only(path, args.device, getattr(torch, dtype_name), quant_type)))
        return {}

    from transformers import AutoTokenizer

    from jupyter_swarm.models import ClientHead
    from jupyter_swarm.models.quantization import perplexity

    tokenizer = AutoTokenizer.from_pretrained(path)
    text_ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    forward_ids = text_ids[:, :args.forward_tokens]
    head = ClientHead.load(path, dtype=torch.float32, device=args.device)
    names = [(d, q) for d in dtypes for q in args.quant_types]
    results: dict[str, dict[str, Any]] = {}
    print(f"model {path}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for dtype_name, quant_type in names:
        name = f"{dtype_name}/{quant_type}"
        results[name] = {"dtype": dtype_name, "quant_type": quant_type,
                         **measure_memory(args, path, dtype_name, quant_type)}
        print(f"  loaded {name}: {results[name]}", flush=True)
    configs = [Configuration(path, head, args.device, getattr(torch, d), q) for d, q in names
               if "error" not in results[f"{d}/{q}"]]
    for config in configs:
        entry = results[config.name]
        logits = config.logits(text_ids)
        entry["perplexity"] = perplexity(logits, text_ids.to(logits.device))
        entry["_logits"] = logits
        entry["tokens"], _ = config.decode(prompt_ids, args.new_tokens)  # also the warm-up
        config.forward_rate(forward_ids)
        entry["decode_tps"], entry["forward_tps"] = [], []
    for rep in range(args.reps):
        shift = rep % len(configs)
        for config in configs[shift:] + configs[:shift]:
            entry = results[config.name]
            entry["decode_tps"].append(config.decode(prompt_ids, args.new_tokens)[1])
            entry["forward_tps"].append(config.forward_rate(forward_ids))
    for entry in results.values():
        if "error" in entry:
            continue
        baseline = results.get(f"{entry['dtype']}/none")
        for key in ("decode_tps", "forward_tps"):
            entry[key] = statistics.median(entry[key])
            if baseline and "error" not in baseline:
                entry[key.replace("_tps", "_ratio")] = entry[key] / baseline[key]
        if baseline and "error" not in baseline:
            entry["max_logit_diff"] = float((entry["_logits"] - baseline["_logits"]).abs().max())
            entry["same_tokens"] = sum(a == b for a, b in zip(entry["tokens"], baseline["tokens"]))
    for entry in results.values():
        entry.pop("_logits", None)
    report(results, args, path)
    summary = {"machine": platform.node(), "device": str(args.device), "threads": torch.get_num_threads(),
               "model": path, "new_tokens": args.new_tokens, "reps": args.reps, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    mib = 2**20
    print(f"\n{Path(path).name} on {args.device}, {torch.get_num_threads()} torch thread(s), {args.reps} reps, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| dtype / quant | MiB per block (predicted) | peak MiB allocated loading all blocks | load s "
          "| decode tok/s (x none) "
          "| 128-token forward tok/s (x none) | perplexity | max logit diff | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e in results.items():
        if "error" in e:
            print(f"| {name} | {e['error']} |||||||| ")
            continue
        print(f"| {name} | {e['block_bytes'] / mib:.2f} ({e['predicted_block_bytes'] / mib:.2f}) "
              f"| {e['peak_load_bytes'] / mib:.0f} | {e['load_s']:.1f} "
              f"| {e['decode_tps']:.1f} ({e.get('decode_ratio', 1.0):.2f}) "
              f"| {e['forward_tps']:.0f} ({e.get('forward_ratio', 1.0):.2f}) | {e['perplexity']:.3f} "
              f"| {e.get('max_logit_diff', 0.0):.3f} | {e.get('same_tokens', len(e['tokens']))}/{len(e['tokens'])} |")


if __name__ == "__main__":
    main()
