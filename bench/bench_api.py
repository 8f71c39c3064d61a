#!/usr/bin/env python
"""The OpenAI-compatible API's cost: streamed chat through the API against generate() on the same client, with the
real SmolLM2-135M-Instruct through a loopback swarm of 3 servers.

    python bench/bench_api.py                       # 48 new tokens, 5 reps per side
    python bench/bench_api.py --reps 9 --new-tokens 64

One swarm (blocks 0:10, 10:20, 20:30) and one client model serve both sides; the calls alternate (the machine is
shared and noisy, so both see the same conditions). "direct" is model.generate() with a streamer; "api" is the
`openai` client's streamed chat completion through `jupyter_swarm.api` on loopback, same prompt, greedy. Reported:
median time to the first text, median decode tokens/s (after the first), and api/direct ratios. The two texts are
checked equal. See bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTION = "Tell me about honey bees."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import openai
    import torch
    from transformers import AutoTokenizer

    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.api.server import ApiServer
    from jupyter_swarm.client.chat import chat_input_ids, chat_messages
    from jupyter_swarm.client.streaming import TextPieceStreamer
    from jupyter_swarm.local_swarm import LocalSwarm
    from jupyter_swarm.models.smollm2 import smollm2_path

    torch.set_num_threads(1)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = chat_messages(QUESTION)
    input_ids = chat_input_ids(tokenizer, messages)
    with LocalSwarm(path, [(0, 10), (10, 20), (20, 30)], extra_args=["--torch-threads", "1"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        api = ApiServer(model, tokenizer, "SmolLM2-135M-Instruct", port=0).start()
        client = openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0)
        try:
            def direct() -> tuple[str, list[float]]:
                times, pieces = [], []
                began = time.perf_counter()

                def on_text(piece: str) -> None:
                    if piece:  # as the API sends them: only pieces with text
                        times.append(time.perf_counter() - began)
                        pieces.append(piece)

                model.generate(input_ids, max_new_tokens=args.new_tokens, do_sample=False,
                               streamer=TextPieceStreamer(tokenizer, on_text))
                return "".join(pieces), times

            def through_api() -> tuple[str, list[float]]:
                times, pieces = [], []
                began = time.perf_counter()
                for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                            max_tokens=args.new_tokens, temperature=0, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        times.append(time.perf_counter() - began)
                        pieces.append(chunk.choices[0].delta.content)
                return "".join(pieces), times

            direct(), through_api()  # warm-up
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "api": []}
            for _ in range(args.reps):
                for name, call in (("direct", direct), ("api", through_api)):
                    text, times = call()
                    results[name].append((times[0], (len(times) - 1) / (times[-1] - times[0])))
                    if name == "direct":
                        expected = text
                    elif text != expected:
                        raise SystemExit(f"the API streamed other text than generate():\n{text!r}\n{expected!r}")
        finally:
            api.stop()
            model.close()
    first = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    rate = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    print(f"SmolLM2-135M-Instruct, 3 loopback servers, {args.new_tokens} new tokens, {args.reps} reps per side")
    for name in ("direct", "api"):
        print(f"  {name:6s}: first text after {1000 * first[name]:.0f} ms, {rate[name]:.1f} pieces/s after it")
    print(f"  api/direct: first text {first['api'] / first['direct']:.2f}x, rate {rate['api'] / rate['direct']:.3f}")
    print("  streamed texts identical: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
