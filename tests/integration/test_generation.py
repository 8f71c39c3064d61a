"""Distributed generation gives the same tokens and logits as running the same weights locally."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.integration.conftest import start_swarm

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])


@pytest.fixture(scope="module", params=["llama", "bloom"])
def two_server_swarm(request, model_path):
    path = model_path(request.param)
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        yield path, swarm


def test_greedy_matches_local(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = connect(path, swarm)
    expected = local_model(path).generate(PROMPT, max_new_tokens=32, do_sample=False)
    got = model.generate(PROMPT, max_new_tokens=32, do_sample=False)
    assert got.shape == (1, PROMPT.shape[1] + 32)
    assert got.tolist() == expected.tolist()


def test_batched_forward_logits_match_local(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = connect(path, swarm)
    batch = torch.randint(4, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = local_model(path)(batch).logits
        got = model(batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sampling_with_seed_matches_local(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = connect(path, swarm)
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(1234)
    expected = local_model(path).generate(PROMPT, **kwargs)
    torch.manual_seed(1234)
    got = model.generate(PROMPT, **kwargs)
    assert got.tolist() == expected.tolist()


def test_beam_search_matches_local(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = connect(path, swarm)
    kwargs = dict(max_new_tokens=12, do_sample=False, num_beams=3, num_return_sequences=2)
    expected = local_model(path).generate(PROMPT.repeat(2, 1), **kwargs)
    got = model.generate(PROMPT.repeat(2, 1), **kwargs)
    assert got.tolist() == expected.tolist()


def test_session_is_shared_by_several_generate_calls(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = connect(path, swarm)
    follow_up = torch.tensor([[5, 6, 7]])
    with model.inference_session(max_length=64) as session:
        first = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        second = model.generate(follow_up, max_new_tokens=8, do_sample=False)
        assert session.position == first.shape[1] + follow_up.shape[1] + 8 - 1
    expected = local_model(path).generate(torch.cat([first, follow_up], dim=1), max_new_tokens=8, do_sample=False)
    assert torch.cat([first, second], dim=1).tolist() == expected.tolist()


def test_two_clients_at_once_get_their_own_results(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    prompts = [PROMPT, torch.tensor([[13, 11, 14, 11, 15, 19, 12, 16, 15, 13]])]
    models = [connect(path, swarm), connect(path, swarm)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = models[i].generate(prompts[i], max_new_tokens=24, do_sample=False)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, prompt in enumerate(prompts):
        assert results[i].tolist() == local_model(path).generate(prompt, max_new_tokens=24, do_sample=False).tolist()


def test_three_servers_greedy_matches_local(model_path, connect, local_model):
    path = model_path("llama")
    with start_swarm(path, [(0, 1), (1, 3), (3, 4)]) as swarm:
        model = connect(path, swarm)
        got = model.generate(PROMPT, max_new_tokens=32, do_sample=False)
        with model.inference_session(max_length=8) as session:
            model.generate(PROMPT[:, :4], max_new_tokens=2, do_sample=False)
            assert [(r.start, r.end) for r in session.routes] == [(0, 1), (1, 3), (3, 4)]
    assert got.tolist() == local_model(path).generate(PROMPT, max_new_tokens=32, do_sample=False).tolist()
