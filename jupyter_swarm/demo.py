"""`jupyter-swarm demo`: a whole swarm on this machine chatting with a real model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jupyter_swarm.client.chat import DEFAULT_SYSTEM_PROMPT

DEMO_QUESTION = "What is the capital of France?"
#: the random model for tests and demos that need no real weights (`tiny`)
TINY_MODEL = dict(family="llama", seed=0, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2)
DEMO_NAMES = {"demo": "SmolLM2-135M-Instruct, a real instruct model (converted once from the package index)",
              "tiny": "a tiny random Llama-style model (8 blocks; gibberish, for tests)"}
SERVER_ARGS = ["--update-period", "5", "--torch-threads", "1"]


def demo_model_path(name: str, *, progress: bool = True) -> str | None:
    """The directory of a named demo model (made on first use), or None when ``name`` is not one of DEMO_NAMES.

    ``demo`` is SmolLM2-135M-Instruct (:func:`jupyter_swarm.models.smollm2.smollm2_path`); ``tiny`` is a random
    8-block Llama (:func:`jupyter_swarm.models.make_tiny_model`), for runs that need no real weights.
    """
    if name == "demo":
        from jupyter_swarm.models.smollm2 import smollm2_path

        return smollm2_path(progress=progress)
    if name == "tiny":
        from jupyter_swarm.models import make_tiny_model
        from jupyter_swarm.paths import user_cache_dir

        return make_tiny_model(str(user_cache_dir() / "models" / "tiny-llama"), **TINY_MODEL)
    return None


def run_demo(prompt: str = DEMO_QUESTION, *, max_new_tokens: int = 64, model: str = "demo",
             system_prompt: str = DEFAULT_SYSTEM_PROMPT, chat: bool = False, initial_peers: Sequence[str] = (),
             swarm_key: str | None = None, read_line: Callable[[], str] = lambda: input("user: ")) -> int:
    """Answer ``prompt`` through a swarm (then chat on with ``chat``): three servers started on loopback and
    stopped at the end, or the swarm at ``initial_peers`` when given.

    ``swarm_key``: a key file; the swarm is then private (default: ``$JUPYTER_SWARM_KEY``, else open)."""
    from transformers import AutoTokenizer

    from jupyter_swarm.client.chat import has_chat_template
    from jupyter_swarm.client.model import AutoDistributedModelForCausalLM
    from jupyter_swarm.p2p.swarm_key import resolve_swarm_key

    key = resolve_swarm_key(swarm_key)  # fails here, before any server starts, if the file is unusable
    print(f"demo model: {DEMO_NAMES.get(model, model)}", flush=True)
    path = demo_model_path(model) or model
    if key is not None:
        print(f"private swarm: swarm key {key.fingerprint}", flush=True)
    with contextlib.ExitStack() as stack:
        peers = list(initial_peers) or _start_local_swarm(path, stack, swarm_key)
        client = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, swarm_key=key)
        stack.callback(client.close)
        tokenizer = AutoTokenizer.from_pretrained(path)
        use_chat = has_chat_template(tokenizer)
        if use_chat:
            print(f"\nsystem: {system_prompt}", flush=True)
        history: list[dict[str, str]] = []  # earlier turns of the chat, sent again with each question
        for turn in _turns(prompt, chat, read_line):
            answer = _answer(client, tokenizer, turn, max_new_tokens, system_prompt if use_chat else None, history,
                             echo=not history)  # later questions were typed at the "user:" prompt
            history += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
    if not initial_peers:
        print("all servers stopped", flush=True)
    return 0


def _start_local_swarm(path: str, stack: contextlib.ExitStack, swarm_key: str | None) -> list[str]:
    from jupyter_swarm.local_swarm import LocalSwarm, default_spans
    from jupyter_swarm.models import load_model_config
    from jupyter_swarm.runtime.server import num_blocks_of

    total = num_blocks_of(load_model_config(path))
    began = time.perf_counter()
    swarm = stack.enter_context(LocalSwarm(path, default_spans(total), extra_args=SERVER_ARGS, swarm_key=swarm_key))
    print(f"started {len(swarm.servers)} servers for the model's {total} blocks in "
          f"{time.perf_counter() - began:.1f} s:", flush=True)
    for server in swarm.servers:
        print(f"  blocks {server.start_block}:{server.end_block}  {server.addrs[0]}", flush=True)
    return swarm.initial_peers


def _turns(first: str, chat: bool, read_line: Callable[[], str]) -> Iterator[str]:
    yield first
    while chat:
        try:
            line = read_line().strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def _answer(client: Any, tokenizer: Any, prompt: str, max_new_tokens: int, system_prompt: str | None,
            history: Sequence[dict[str, str]], *, echo: bool = True) -> str:
    """One turn: stream the answer to ``prompt`` as it is generated, then the chain of servers and the speed.
    Without a system prompt (a model without a chat template) the prompt is continued as plain text."""
    from jupyter_swarm.client.chat import chat_input_ids, chat_messages
    from jupyter_swarm.client.streaming import TextPieceStreamer

    if system_prompt is not None:
        input_ids = chat_input_ids(tokenizer, chat_messages(prompt, system_prompt, history))
        print(f"user: {prompt}\nassistant: " if echo else "assistant: ", end="", flush=True)
    else:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        print(f"\nprompt: {prompt!r}\ngenerating {max_new_tokens} tokens (greedy):\n{prompt}", end="", flush=True)
    times: list[float] = []
    pieces: list[str] = []

    def show(piece: str) -> None:
        times.append(time.perf_counter())
        pieces.append(piece)
        print(piece, end="", flush=True)

    with client.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
        client.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                        streamer=TextPieceStreamer(tokenizer, show))
        chain = " -> ".join(f"{r.peer_id[-8:]} [{r.start}:{r.end}]" for r in session.routes)
    print(f"\n\n  chain of servers: client -> {chain} -> client")
    gaps = [b - a for a, b in zip(times, times[1:])]
    if gaps:
        mean = sum(gaps) / len(gaps)
        print(f"  {len(times)} tokens; per-token latency: median {1000 * sorted(gaps)[len(gaps) // 2]:.1f} ms, "
              f"mean {1000 * mean:.1f} ms ({1 / mean:.1f} tokens/s)\n", flush=True)
    return "".join(pieces)
