"""Server-to-server push: each server sends its output straight to the next one; the client still gets them all."""

from __future__ import annotations

import torch

from tests.integration.conftest import start_swarm
from tests.integration.test_failures import _KillMidGeneration

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])


def test_push_generates_the_local_tokens_and_the_client_keeps_every_input(model_path, connect, local_model):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 3), (3, 4)]) as swarm:
        model = connect(path, swarm)
        model.swarm.push = True
        with model.inference_session(max_length=64) as session:
            got = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
            assert session._push_ready and len(session.routes) == 3
            assert all(span.inputs().shape[1] == PROMPT.shape[1] + 19 for span in session._spans)
        expected = local_model(path).generate(PROMPT, max_new_tokens=20, do_sample=False)
        assert got.tolist() == expected.tolist()


def test_push_recovers_from_a_sigkill_with_the_same_tokens(model_path, connect, local_model):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4), (1, 4)]) as swarm:
        model = connect(path, swarm, blocked_servers=[])
        model.swarm.push = True
        killer = _KillMidGeneration(model, swarm, block=3, after=8)
        with model.inference_session(max_length=64) as session:
            got = model.generate(PROMPT, max_new_tokens=30, do_sample=False, streamer=killer)
            assert killer.killed is not None and session.failovers >= 1
        expected = local_model(path).generate(PROMPT, max_new_tokens=30, do_sample=False)
        assert got.tolist() == expected.tolist()


def test_hostile_pushes_are_dropped_and_sessions_ids_cannot_be_hijacked(model_path, connect, local_model):
    import msgpack

    from jupyter_swarm.client.swarm import join_swarm
    from jupyter_swarm.wire.messages import pack
    from jupyter_swarm.wire.protocols import INFERENCE, PUSH
    from jupyter_swarm.wire.tensors import encode_tensor

    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        model = connect(path, swarm)
        model.swarm.push = True
        node = join_swarm(swarm.initial_peers)
        try:
            victim = swarm.servers[1].peer_id

            async def attack() -> list:
                stream = await node.open_stream(victim, PUSH)
                for payload in (b"\xc1 garbage", msgpack.packb([1, 2]), pack({"type": "step"}),
                                pack({"type": "step", "session_id": "nobody", "position": 0,
                                      "hidden": encode_tensor(torch.zeros(1, 1, 64))})):
                    await stream.send(payload)
                await stream.close()
                opening = await node.open_stream(victim, INFERENCE)
                await opening.send(pack({"type": "open", "max_length": 8, "batch_size": 1, "session_id": "x" * 65}))
                answer = await opening.recv()
                await opening.close()
                return [answer]

            (answer,) = node.call(attack)
            assert b"session_id must be" in answer
        finally:
            node.shutdown()
        got = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
        assert got.tolist() == local_model(path).generate(PROMPT, max_new_tokens=10, do_sample=False).tolist()
        assert all(s.process.poll() is None for s in swarm.servers)
