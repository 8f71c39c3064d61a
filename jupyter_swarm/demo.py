"""`jupyter-swarm demo`: a whole swarm on this machine, with nothing downloaded."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEMO_MODEL = dict(family="llama", seed=0, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2)
DEMO_SPANS = [(0, 4), (4, 8), (2, 8)]


def run_demo(prompt: str = "Once upon a time", max_new_tokens: int = 32, workdir: str | None = None,
             swarm_key: str | None = None) -> int:
    """Create the demo model (cached), start three servers, generate through them, shut everything down.

    ``swarm_key``: a key file; the demo swarm is then private (default: ``$JUPYTER_SWARM_KEY``, else open)."""
    from transformers import AutoTokenizer

    from jupyter_swarm.client.model import AutoDistributedModelForCausalLM
    from jupyter_swarm.local_swarm import LocalSwarm
    from jupyter_swarm.models import make_tiny_model
    from jupyter_swarm.p2p.swarm_key import resolve_swarm_key

    root = Path(workdir or os.path.expanduser("~/.cache/jupyter-swarm/demo"))
    print(f"demo model: a random Llama-style model ({DEMO_MODEL['num_layers']} blocks, hidden size "
          f"{DEMO_MODEL['hidden_size']}, 2 KV heads) in {root / 'demo-llama'}", flush=True)
    path = make_tiny_model(str(root / "demo-llama"), **DEMO_MODEL)
    began = time.perf_counter()
    key = resolve_swarm_key(swarm_key)  # fails here, before any server starts, if the file is unusable
    if key is not None:
        print(f"private swarm: swarm key {key.fingerprint}", flush=True)
    with LocalSwarm(path, DEMO_SPANS, extra_args=["--update-period", "5", "--torch-threads", "1"],
                    swarm_key=swarm_key) as swarm:
        print(f"started {len(swarm.servers)} servers in {time.perf_counter() - began:.1f} s:", flush=True)
        for server in swarm.servers:
            print(f"  blocks {server.start_block}:{server.end_block}  {server.addrs[0]}", flush=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, swarm_key=key)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            streamer = _TimingStreamer(tokenizer)
            with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
                print(f"\nprompt: {prompt!r}\ngenerating {max_new_tokens} tokens (greedy):\n", flush=True)
                model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
                chain = " -> ".join(f"{r.peer_id[-8:]} [{r.start}:{r.end}]" for r in session.routes)
            print("\n\nchain of servers: client -> " + chain + " -> client")
            gaps = streamer.gaps()
            if gaps:
                print(f"per-token latency: median {1000 * sorted(gaps)[len(gaps) // 2]:.1f} ms, "
                      f"mean {1000 * sum(gaps) / len(gaps):.1f} ms ({1 / (sum(gaps) / len(gaps)):.1f} tokens/s)")
        finally:
            model.close()
    print("all servers stopped", flush=True)
    return 0


class _TimingStreamer:
    """A generate() streamer that prints tokens as they arrive and records when each came."""

    def __init__(self, tokenizer: object):
        self.tokenizer = tokenizer
        self.times: list[float] = []
        self._first = True

    def put(self, value: object) -> None:
        if self._first:  # generate() first hands over the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())
        print(self.tokenizer.decode(value.reshape(-1).tolist()), end="", flush=True)  # type: ignore[attr-defined]

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]
