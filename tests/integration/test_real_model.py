"""The real SmolLM2-135M-Instruct through a swarm of three server processes: the same tokens as local, and the
demo's chat turn. One swarm (blocks 0:10, 10:20, 20:30) serves every test of this module."""

from __future__ import annotations

import pytest

from jupyter_swarm.client.chat import chat_input_ids, chat_messages
from tests.integration.conftest import start_swarm

pytestmark = [pytest.mark.integration, pytest.mark.real_model]

SPANS = [(0, 10), (10, 20), (20, 30)]


@pytest.fixture(scope="module")
def smollm2_swarm(smollm2_dir):
    with start_swarm(smollm2_dir, SPANS) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_greedy_through_three_servers_equals_local(smollm2_dir, smollm2_swarm, tokenizer, connect, local_model):
    input_ids = chat_input_ids(tokenizer, chat_messages("Tell me a fun fact about bees."))
    expected = local_model(smollm2_dir).generate(input_ids, max_new_tokens=40, do_sample=False)
    model = connect(smollm2_dir, smollm2_swarm)
    with model.inference_session(max_length=input_ids.shape[1] + 40) as session:
        got = model.generate(input_ids, max_new_tokens=40, do_sample=False)
        assert [(r.start, r.end) for r in session.routes] == SPANS
    assert got.shape[1] == input_ids.shape[1] + 40  # the answer is longer than 40 tokens: no early stop
    assert got.tolist() == expected.tolist()
    assert "bees" in tokenizer.decode(got[0, input_ids.shape[1]:]).lower()


def test_demo_chat_turn_streams_the_local_answer(smollm2_dir, smollm2_swarm, tokenizer, local_model, capsys):
    from jupyter_swarm.demo import DEMO_QUESTION, run_demo

    input_ids = chat_input_ids(tokenizer, chat_messages(DEMO_QUESTION))
    expected = local_model(smollm2_dir).generate(input_ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(expected[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert run_demo(max_new_tokens=24, initial_peers=smollm2_swarm.initial_peers) == 0
    out = capsys.readouterr().out
    assert f"user: {DEMO_QUESTION}\nassistant: {answer}\n" in out
    assert "chain of servers: client -> " in out and "tokens/s" in out
