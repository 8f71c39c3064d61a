#!/usr/bin/env python
"""Fine-tuning speed (forward + backward tokens/s) through a loopback swarm, against local training of the same model.

    python bench/bench_finetune.py                          # 2 servers, deep_ptune, batch 4 x 128 tokens, 5 reps
    python bench/bench_finetune.py --mode ptune --batch 8 --seq-len 64 --json bench/results/finetune.json
    python bench/bench_finetune.py --replicas --chunk-tokens 300  # both servers hold every block; the batch is
                                                                 # split into chunks that run on both at once

The script starts `jupyter-swarm serve` subprocesses on loopback (blocks split evenly), connects an
AutoDistributedModelForCausalLM with trainable prompts, and builds the local reference: transformers' model with
the same weights, frozen, and the same prompts (prepended; for deep_ptune also added before every block). Each
measured step is ``loss = model(batch, labels=batch).loss; loss.backward(); opt.step()`` with AdamW on the prompts.
Local and swarm steps alternate (the machine is shared and noisy, so both see the same conditions); the report
gives median tokens/s (batch x seq_len real tokens per step / step wall time) and swarm/local. The first step's
prompt gradients of both sides are compared (float32: they must agree to ~1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / "results" / "models"
sys.path.insert(0, str(BENCH_DIR.parent))

#: the same Llama-shaped ~26M-parameter model as bench_inference.py
MODEL = dict(family="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, vocab_size=4096,
             intermediate_size=1376, seed=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["ptune", "deep_ptune"], default="deep_ptune")
    p.add_argument("--pre-seq-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="real tokens per row (the prompts come on top)")
    p.add_argument("--reps", type=int, default=5, help="measured training steps per side")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per side first")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--replicas", action="store_true",
                   help="every server holds every block (instead of splitting the blocks between them)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="send the batch as concurrent chunks of rows of at most this many tokens "
                        "(default: one request per step unless the batch exceeds the servers' limit)")
    p.add_argument("--client-threads", type=int, default=1, help="torch threads of this process (0 = default)")
    p.add_argument("--server-threads", type=int, default=1, help="--torch-threads of every server (0 = default)")
    p.add_argument("--num-layers", type=int, default=MODEL["num_layers"])
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the benchmark model is made (once)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.local_swarm import LocalSwarm
    from jupyter_swarm.models import make_tiny_model
    from tests.integration.finetune_reference import LocalPrompts, causal_lm_loss

    if args.client_threads:
        torch.set_num_threads(args.client_threads)
    spec = {**MODEL, "num_layers": args.num_layers}
    name = "finetune-" + "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
    path = make_tiny_model(os.path.join(args.cache_dir, name), **spec)
    n = spec["num_layers"]
    cuts = [round(i * n / args.servers) for i in range(args.servers + 1)]
    spans = [(0, n)] * args.servers if args.replicas else [(cuts[i], cuts[i + 1]) for i in range(args.servers)]
    server_args = ["--update-period", "30"] + (["--torch-threads", str(args.server_threads)]
                                               if args.server_threads else [])
    local = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    batch = torch.randint(4, spec["vocab_size"], (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq_len

    with LocalSwarm(path, spans, extra_args=server_args) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, tuning_mode=args.mode, pre_seq_len=args.pre_seq_len)
        if args.chunk_tokens:
            model.max_chunk_tokens = args.chunk_tokens
        try:
            reference = LocalPrompts(model.tuning)
            swarm_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            local_opt = torch.optim.AdamW(list(reference.parameters()), lr=1e-3)

            def swarm_step() -> float:
                swarm_opt.zero_grad()
                loss = model(batch, labels=batch).loss
                loss.backward()
                swarm_opt.step()
                return loss.item()

            def local_step() -> float:
                local_opt.zero_grad()
                loss = causal_lm_loss(reference.logits(local, batch), batch)  # adds the deep prompts itself
                loss.backward()
                local_opt.step()
                return loss.item()

            # correctness first: the same gradients on the same starting prompts
            swarm_opt.zero_grad()
            model(batch, labels=batch).loss.backward()
            local_opt.zero_grad()
            causal_lm_loss(reference.logits(local, batch), batch).backward()
            max_diff = max(float((a.grad - b.grad).abs().max())
                           for a, b in zip([p for p in model.parameters() if p.requires_grad], reference.parameters()))
            grad_scale = max(float(b.grad.abs().max()) for b in reference.parameters())

            for _ in range(args.warmup):
                swarm_step()
                local_step()
            times: dict[str, list[float]] = {"local": [], "swarm": []}
            for _ in range(args.reps):
                for side, step in (("local", local_step), ("swarm", swarm_step)):
                    start = time.perf_counter()
                    step()
                    times[side].append(time.perf_counter() - start)
        finally:
            model.close()

    rate = {side: tokens / statistics.median(ts) for side, ts in times.items()}
    result = {
        "benchmark": "finetune", "mode": args.mode, "pre_seq_len": args.pre_seq_len, "batch": args.batch,
        "seq_len": args.seq_len, "servers": args.servers, "spans": spans, "model": spec,
        "chunk_tokens": args.chunk_tokens,
        "client_threads": args.client_threads, "server_threads": args.server_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "step_seconds": times, "tokens_per_s": rate, "swarm_over_local": rate["swarm"] / rate["local"],
        "max_grad_diff": max_diff, "max_abs_grad": grad_scale,
    }
    print(f"{args.mode} pre_seq_len={args.pre_seq_len}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.servers} servers {spans}, chunks of {args.chunk_tokens or 'all'} tokens, {args.reps} reps (median)")
    print(f"  local  {rate['local']:9.1f} tokens/s  ({statistics.median(times['local']) * 1000:.0f} ms/step)")
    print(f"  swarm  {rate['swarm']:9.1f} tokens/s  ({statistics.median(times['swarm']) * 1000:.0f} ms/step)")
    print(f"  swarm/local = {result['swarm_over_local']:.3f}; max |grad swarm - grad local| = {max_diff:.2e} "
          f"(max |grad| = {grad_scale:.2e})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
