"""Speculative decoding over the swarm: transformers' assisted generation (a draft model, prompt lookup) checks
several tokens per trip through the servers, which step back past rejected ones; the tokens are local generate()'s."""

from __future__ import annotations

import copy

import pytest
import torch

from jupyter_swarm.client.inference import InferenceSession
from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.wire.messages import pack, unpack
from jupyter_swarm.wire.protocols import INFERENCE
from jupyter_swarm.wire.tensors import encode_tensor
from tests.integration.conftest import start_swarm
from tests.integration.test_bad_input import _error_of, _exchange
from tests.integration.test_failures import _KillMidGeneration

# the tiny model's own greedy text from a random prompt: prompt lookup finds some of its bigrams again
PROMPT_SEED = 2
NEW_TOKENS = 24


def _prompt(local) -> torch.Tensor:
    start = torch.randint(4, 500, (1, 10), generator=torch.Generator().manual_seed(PROMPT_SEED))
    return local.generate(start, max_new_tokens=40, do_sample=False)


def _draft(local) -> torch.nn.Module:
    """A draft model that agrees with the model on about half the tokens: the model with its last block perturbed."""
    draft = copy.deepcopy(local)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in draft.model.layers[-1].parameters():
            weight.add_(torch.randn(weight.shape, generator=noise) * 0.02)
    # 4 candidates a round, always (a random model is never confident enough for transformers' default threshold)
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    return draft


@pytest.fixture(scope="module")
def swarm(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 3), (3, 4)]) as swarm:
        yield path, swarm


@pytest.fixture
def client_steps(monkeypatch) -> list[int]:
    """The first block of every step the client sent to one server itself (relayed steps are not counted)."""
    sent: list[int] = []
    original = InferenceSession._send_step

    async def counted(self, span, *args, **kwargs):
        sent.append(span.route.start)
        return await original(self, span, *args, **kwargs)

    monkeypatch.setattr(InferenceSession, "_send_step", counted)
    return sent


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "client-driven"])
def test_draft_model_and_prompt_lookup_give_exactly_the_local_tokens(swarm, connect, local_model, client_steps, relay):
    path, local_swarm = swarm
    local = local_model(path)
    prompt = _prompt(local)
    expected = local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    model = connect(path, local_swarm)
    model.swarm.push = relay
    for how in [dict(assistant_model=_draft(local)), dict(prompt_lookup_num_tokens=4)]:
        with model.inference_session(max_length=128) as session:
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **how)
            assert session._push_ready == relay and session.failovers == 0
            position = session.position
        assert got.tolist() == expected.tolist(), how
        stats = model.speculation
        # some candidates held (several tokens per trip) and some did not (the servers stepped back)
        assert 0 < stats.accepted < stats.drafted and stats.rounds < NEW_TOKENS, (how, stats)
        assert position == got.shape[1] - 1  # the servers hold every token but the last, none of the rejected
    assert (client_steps == []) == relay  # relayed: every step, many tokens each, went server to server


def test_sampling_with_prompt_lookup_draws_what_local_sampling_draws(swarm, connect, local_model):
    path, local_swarm = swarm
    local = local_model(path)
    prompt = _prompt(local)
    model = connect(path, local_swarm)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.7, prompt_lookup_num_tokens=4)
    torch.manual_seed(11)
    expected = local.generate(prompt, **settings)
    torch.manual_seed(11)
    got = model.generate(prompt, **settings)
    assert got.tolist() == expected.tolist()
    assert model.speculation.drafted > 0


def test_a_session_continues_after_a_speculative_call_and_the_server_steps_back_on_request(swarm, connect,
                                                                                         local_model):
    path, local_swarm = swarm
    local = local_model(path)
    prompt = _prompt(local)
    model = connect(path, local_swarm)
    with model.inference_session(max_length=128):
        first = model.generate(prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=4)
        more = model.generate(None, max_new_tokens=8, do_sample=False)  # plain steps after the speculative ones
    expected = local.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.cat([first, more], 1).tolist() == expected.tolist()

    node = join_swarm(local_swarm.initial_peers)
    try:
        hidden = lambda n: encode_tensor(torch.randn(1, n, 64))  # noqa: E731
        answers = _exchange(node, local_swarm.servers[0].peer_id, INFERENCE, [
            pack({"type": "open", "max_length": 8, "batch_size": 1}),
            pack({"type": "step", "position": 0, "hidden": hidden(5)}),
            pack({"type": "step", "position": 2, "hidden": hidden(3)}),  # back to 2: 3 tokens dropped, 3 new
            pack({"type": "step", "position": 7, "hidden": hidden(1)}),  # past the cache's end: refused
            pack({"type": "step", "position": 4, "hidden": hidden(5)}),  # 4 + 5 > max_length 8: refused
            pack({"type": "step", "position": 5, "hidden": hidden(1)}),  # the session still works
        ])
    finally:
        node.shutdown()
    assert [unpack(answers[i], "output")["position"] for i in (1, 2, 5)] == [5, 5, 6]
    assert "step starts at position 7 but the session's cache holds 5 tokens" in _error_of(answers[3])
    assert "4 + 5 tokens exceed its max_length 8" in _error_of(answers[4])


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "client-driven"])
def test_a_server_killed_during_speculative_generation_changes_no_token(model_path, connect, local_model, relay):
    path = model_path("llama")
    local = local_model(path)
    prompt = _prompt(local)
    with start_swarm(path, [(0, 2), (2, 4), (1, 4)]) as swarm:
        model = connect(path, swarm)
        model.swarm.push = relay
        killer = _KillMidGeneration(model, swarm, block=3, after=4)  # after 4 rounds, a rejection behind it
        with model.inference_session(max_length=128) as session:
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=killer,
                                 assistant_model=_draft(local))
            assert killer.killed is not None and session.failovers >= 1
            assert all(r.peer_id != killer.killed for r in session.routes)
        assert 0 < model.speculation.accepted < model.speculation.drafted
    assert got.tolist() == local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
