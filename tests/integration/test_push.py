"""Relayed steps: the client sends a step to the first server, each server pushes its output to the next, and the
last one answers with the output and every span's input (the client keeps them for replay)."""

from __future__ import annotations

import torch

from tests.integration.conftest import start_swarm

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])


def test_relayed_steps_give_the_local_tokens_and_the_client_keeps_every_span_input(model_path, connect, local_model,
                                                                                   monkeypatch):
    from jupyter_swarm.client.inference import InferenceSession

    sent_by_client = []
    original_send_step = InferenceSession._send_step

    async def counted_send_step(self, span, *args, **kwargs):
        sent_by_client.append(span.route.start)
        return await original_send_step(self, span, *args, **kwargs)

    monkeypatch.setattr(InferenceSession, "_send_step", counted_send_step)
    path = model_path("llama")
    local = local_model(path)
    with start_swarm(path, [(0, 2), (2, 3), (3, 4)]) as swarm:
        model = connect(path, swarm)
        assert model.swarm.push  # relaying is the default
        with model.inference_session(max_length=64) as session:
            got = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
            assert session._push_ready and [(r.start, r.end) for r in session.routes] == [(0, 2), (2, 3), (3, 4)]
            assert sent_by_client == []  # every step went client -> first server -> ... -> client
            # the inputs the client kept for replay are what each span really received
            with torch.no_grad():
                states = local(got[:, :-1], output_hidden_states=True).hidden_states  # states[b]: input of block b
            for span in session._spans:
                assert torch.allclose(span.inputs(), states[span.route.start], atol=1e-4)
        assert got.tolist() == local.generate(PROMPT, max_new_tokens=20, do_sample=False).tolist()


def test_a_server_that_cannot_push_hands_the_step_back_to_the_client(model_path, connect, local_model, monkeypatch):
    from libp2p.peer.id import ID

    from jupyter_swarm.client import inference
    from jupyter_swarm.p2p.identity import new_identity

    original_links = inference._relay_links

    def broken_links(chain):
        links = original_links(chain)
        links[0]["push_to"].peer_id = str(ID.from_pubkey(new_identity().public_key))  # a peer nobody runs
        links[0]["push_to"].addrs = []
        return links

    monkeypatch.setattr(inference, "_relay_links", broken_links)
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        model = connect(path, swarm)
        with model.inference_session(max_length=64) as session:
            got = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
            assert not session._push_ready and session.failovers == 0  # the client took over; nobody failed
            assert all(span.inputs().shape[1] == PROMPT.shape[1] + 11 for span in session._spans)
        assert got.tolist() == local_model(path).generate(PROMPT, max_new_tokens=12, do_sample=False).tolist()


def test_hostile_pushes_are_dropped_and_sessions_ids_cannot_be_hijacked(model_path, connect, local_model):
    import msgpack

    from jupyter_swarm.client.swarm import join_swarm
    from jupyter_swarm.wire.messages import pack
    from jupyter_swarm.wire.protocols import INFERENCE, PUSH
    from jupyter_swarm.wire.tensors import encode_tensor

    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        model = connect(path, swarm)
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
            assert b"'session_id' must be 1..64 characters" in answer
        finally:
            node.shutdown()
        got = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
        assert got.tolist() == local_model(path).generate(PROMPT, max_new_tokens=10, do_sample=False).tolist()
        assert all(s.process.poll() is None for s in swarm.servers)


def test_a_session_takes_pushed_steps_only_from_its_previous_server_and_refuses_a_bad_carry(model_path):
    from jupyter_swarm.client.swarm import join_swarm
    from jupyter_swarm.p2p.identity import new_identity
    from jupyter_swarm.wire.messages import pack, unpack
    from jupyter_swarm.wire.protocols import INFERENCE, PUSH
    from jupyter_swarm.wire.tensors import decode_tensor, encode_tensor

    path = model_path("llama")
    hidden = torch.randn(1, 1, 64)
    step = {"type": "step", "hidden": encode_tensor(hidden), "position": 0, "push": True}
    with start_swarm(path, [(0, 4)]) as swarm:
        server = swarm.servers[0].peer_id
        node = join_swarm(swarm.initial_peers)
        try:
            async def session(accept_from: str, push_is_ours: bool) -> list:
                session_id = "s" + accept_from[-8:]
                stream = await node.open_stream(server, INFERENCE)
                await stream.send(pack({"type": "open", "max_length": 8, "batch_size": 1, "session_id": session_id,
                                        "accept_from": accept_from}))
                unpack(await stream.recv(), "opened")
                pusher = await node.open_stream(server, PUSH)
                await pusher.send(pack({**step, "session_id": session_id, "carry": []}))
                await pusher.close()
                answers = [await stream.recv()] if push_is_ours else []
                await stream.send(pack({**step, "position": int(push_is_ours), "carry": [1, 2]}))
                answers.append(await stream.recv())
                if not push_is_ours:  # the client's own first step: served at position 0, so the push was dropped
                    await stream.send(pack(step))
                    answers.append(await stream.recv())
                await stream.close()
                return answers

            from libp2p.peer.id import ID

            stranger = str(ID.from_pubkey(new_identity().public_key))
            bad_carry, first = node.call(session, stranger, False)
            assert b"carry must be a list" in bad_carry
            output = unpack(first, "output")
            assert output["position"] == 1 and output["carry"] == []

            pushed, bad_carry = node.call(session, node.peer_id, True)  # pushed by the peer it accepts: served
            assert b"carry must be a list" in bad_carry
            output = unpack(pushed, "output")
            assert output["position"] == 1 and len(output["carry"]) == 1
            assert torch.equal(decode_tensor(output["carry"][0]), hidden)  # it carries its own input back
        finally:
            node.shutdown()
        assert swarm.servers[0].process.poll() is None
