"""Fuzzing: 10^4 generated messages across every protocol against live servers while two honest sessions run.
No server crashes or hits a bug, and the honest sessions' tokens are the local model's (bench/bench_fuzz.py
sends 10^5)."""

from __future__ import annotations

import os
import threading

import torch

from jupyter_swarm.client.swarm import join_swarm
from tests.integration.conftest import start_swarm
from tests.integration.wire_fuzz import WireFuzzer, fuzz_servers

FUZZ_MESSAGES = int(os.environ.get("JUPYTER_SWARM_FUZZ_MESSAGES", 10_000))
PROMPTS = [torch.tensor([[1, 17, 42, 99, 7]]), torch.tensor([[4, 5, 8, 13, 21, 34]])]


def test_fuzzed_messages_never_crash_a_server_nor_change_honest_tokens(model_path, connect, local_model):
    path = model_path("llama")
    local = local_model(path)
    expected = [local.generate(p, max_new_tokens=8, do_sample=False).tolist() for p in PROMPTS]
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        honest = [connect(path, swarm) for _ in PROMPTS]
        done = threading.Event()
        results: list[tuple[int, list]] = []
        errors: list[BaseException] = []

        def generate_until_done(k: int) -> None:
            try:
                while not done.is_set():
                    results.append((k, honest[k].generate(PROMPTS[k], max_new_tokens=8, do_sample=False).tolist()))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=generate_until_done, args=(k,)) for k in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        node = join_swarm(swarm.initial_peers)
        try:
            report = node.call(fuzz_servers, node, [s.peer_id for s in swarm.servers], WireFuzzer(11, 64),
                               FUZZ_MESSAGES)
        finally:
            done.set()
            node.shutdown()
            for thread in threads:
                thread.join(120)
        print(f"fuzz: {report.total} messages {dict(report.sent)}; answers {dict(report.answers)}")
        assert report.total == FUZZ_MESSAGES and all(report.sent[p] for p in ("rpc", "inference", "push", "records"))
        assert not report.bugs, report.bugs[:5]  # every bad message got a specific refusal, never "server error"
        # most messages were refused, and the valid ones went deep: computed outputs of every kind came back
        assert report.answers["refused"] > sum(report.answers.values()) / 2
        assert all(report.answers[f"ok:{kind}"] for kind in ("opened", "output", "forward_result", "backward_result",
                                                             "info_result", "found", "received"))
        for server in swarm.servers:
            assert server.process.poll() is None, "".join(server.output[-30:])
            assert not any("Traceback" in line for line in server.output), "".join(server.output[-60:])
    assert not errors, errors
    assert {k for k, _ in results} == {0, 1}
    assert all(tokens == expected[k] for k, tokens in results), "an honest session's tokens changed"
