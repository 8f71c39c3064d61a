#!/usr/bin/env python
"""Size and error of each way activations can travel between peers, on a real model's hidden states.

    python bench/bench_compression.py                       # SmolLM2-135M-Instruct split as 3 servers would hold it
    python bench/bench_compression.py --spans 0:15 15:30 --json bench/results/compression.json

The ways: ``none``, ``float16``, ``bfloat16`` and ``blockwise8`` (bitsandbytes' dynamic blockwise quantizer, blocks of
256: what jupyter-swarm sends), against the hand-written linear 8-bit quantizer jupyter-swarm used before (scale =
absolute maximum / 127 per block; kept here only as the baseline, with its old block of 4096 values and with 256).

The model runs locally, split into the spans servers would hold; every hop (client -> server 1 -> ... -> client)
encodes and decodes the hidden states, as the wire does. Reported per way:

* bytes per value and the relative and largest error of the tensors crossing each hop (the text's 363 tokens);
* end to end: perplexity on tests/data/perplexity.txt, the largest logit difference from ``none``, and how many of 32
  greedy tokens (generated step by step with the blocks' cache, each step's hidden states compressed) equal
  ``none``'s;
* microseconds to encode and decode one token's hidden states and the whole text's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import PROMPT, TEXT, model_path  # noqa: E402

Codec = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def linear_8bit(block: int) -> Codec:
    """The hand-written linear blockwise int8 quantizer jupyter-swarm used before bitsandbytes' (the baseline)."""

    def codec(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        flat = tensor.float().flatten()
        pad = (-flat.numel()) % block
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
        scales = blocks.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(blocks / scales[:, None]).clamp(-127, 127).to(torch.int8)
        out = (q.float() * scales[:, None]).flatten()[:flat.numel()].reshape(tensor.shape)
        return out.to(tensor.dtype), flat.numel() + 4 * scales.numel()

    return codec


def wire(compression: str) -> Codec:
    from jupyter_swarm.wire.tensors import Compression, decode_tensor, encode_tensor

    def codec(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        encoded = encode_tensor(tensor, Compression(compression))
        return decode_tensor(encoded), len(encoded["data"]) + len(encoded["scales"])

    return codec


WAYS: dict[str, Codec] = {"none": wire("none"), "float16": wire("float16"), "bfloat16": wire("bfloat16"),
                          "blockwise8 (bitsandbytes, 256)": wire("blockwise8"),
                          "linear 8-bit, 4096 (before)": linear_8bit(4096), "linear 8-bit, 256": linear_8bit(256)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--spans", nargs="+", default=["0:10", "10:20", "20:30"], help="the servers' spans, in order")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class SplitModel:
    """The model as a swarm holds it: the client's head and one span per server, every hop through ``codec``."""

    def __init__(self, path: str, spans: list[tuple[int, int]]):
        from jupyter_swarm.models import BlockSpan, ClientHead

        self.head = ClientHead.load(path, dtype=torch.float32)
        self.spans = [BlockSpan.load(path, a, b, dtype=torch.float32) for a, b in spans]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, codec: Codec, caches: list[Any] | None = None,
            hops: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        hidden = self.head.embed(input_ids)
        for i, span in enumerate(self.spans):
            hidden = self._hop(hidden, codec, hops)
            hidden = span(hidden, cache=None if caches is None else caches[i])
        return self.head.logits(self._hop(hidden, codec, hops))

    @staticmethod
    def _hop(hidden: torch.Tensor, codec: Codec, hops: list | None) -> torch.Tensor:
        sent, size = codec(hidden)
        if hops is not None:
            hops.append((hidden, sent, size))
        return sent

    def greedy(self, input_ids: torch.Tensor, codec: Codec, new_tokens: int) -> list[int]:
        caches = [span.new_cache(1, input_ids.shape[1] + new_tokens) for span in self.spans]
        tokens: list[int] = []
        ids = input_ids
        for _ in range(new_tokens):
            token = self.run(ids, codec, caches)[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            ids = token
        return tokens


def timed(fn: Callable[[], Any], reps: int = 20) -> float:
    fn()
    samples = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from jupyter_swarm.models.quantization import perplexity

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_path(args)
    spans = [tuple(int(x) for x in s.split(":")) for s in args.spans]
    model = SplitModel(path, spans)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = model.run(text_ids, WAYS["none"])
    reference_tokens = model.greedy(prompt_ids, WAYS["none"], args.new_tokens)
    one_token = torch.randn(1, 1, model.head.hidden_size)
    results: dict[str, dict[str, Any]] = {}
    for name, codec in WAYS.items():
        hops: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        logits = model.run(text_ids, codec, hops=hops)
        tokens = model.greedy(prompt_ids, codec, args.new_tokens)
        results[name] = {
            "bytes_per_value": sum(size for _, _, size in hops) / sum(h.numel() for h, _, _ in hops),
            "hop_relative_error": [float((s - h).norm() / h.norm()) for h, s, _ in hops],
            "hop_max_error": [float((s - h).abs().max()) for h, s, _ in hops],
            "hop_absmax": [float(h.abs().max()) for h, _, _ in hops],
            "perplexity": perplexity(logits, text_ids),
            "max_logit_diff": float((logits - reference).abs().max()),
            "same_greedy_tokens": sum(a == b for a, b in zip(tokens, reference_tokens)),
            "us_one_token": timed(lambda: codec(one_token)),
            "us_text": timed(lambda: codec(hops[0][0]), reps=5),
        }
    report(results, spans, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": path, "spans": args.spans, "results": results}, indent=1))
    return results


def report(results: dict[str, dict[str, Any]], spans: list[tuple[int, int]], args: argparse.Namespace) -> None:
    hops = ["client"] + [f"{a}:{b}" for a, b in spans]
    print(f"\nhops: {' -> '.join(hops)} -> client; largest |value| per hop: "
          + ", ".join(f"{v:.0f}" for v in results["none"]["hop_absmax"]))
    print("| way | bytes/value | relative error per hop | largest error per hop | perplexity | max logit diff "
          "| same greedy tokens | µs per token (whole text) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bytes_per_value']:.3f} | {' / '.join(f'{e:.4f}' for e in r['hop_relative_error'])} "
              f"| {' / '.join(f'{e:.3g}' for e in r['hop_max_error'])} | {r['perplexity']:.3f} "
              f"| {r['max_logit_diff']:.3f} | {r['same_greedy_tokens']}/{args.new_tokens} "
              f"| {r['us_one_token']:.0f} ({r['us_text']:.0f}) |")


if __name__ == "__main__":
    main()
