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


@pytest.fixture(scope="module")
def api_url(smollm2_dir, smollm2_swarm, tokenizer):
    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.api.server import ApiServer

    model = AutoDistributedModelForCausalLM.from_pretrained(smollm2_dir, initial_peers=smollm2_swarm.initial_peers)
    server = ApiServer(model, tokenizer, "SmolLM2-135M-Instruct", port=0).start()
    yield server.url
    server.stop()
    model.close()


def test_openai_client_streams_the_text_generate_makes(smollm2_dir, api_url, tokenizer, local_model):
    import time

    import openai

    client = openai.OpenAI(base_url=api_url, api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    messages = chat_messages("Name three colours of the rainbow.", "You are a helpful assistant.")
    input_ids = chat_input_ids(tokenizer, messages)
    local = local_model(smollm2_dir).generate(input_ids, max_new_tokens=32, do_sample=False)
    expected = tokenizer.decode(local[0, input_ids.shape[1]:], skip_special_tokens=True)

    began = time.perf_counter()
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=32,
                                            temperature=0, stream=True)
    pieces, first_piece_at = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first_piece_at = first_piece_at or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    ended = time.perf_counter()
    assert "".join(pieces) == expected and len(pieces) > 5  # streamed piece by piece, the same text
    print(f"\nAPI stream: first text after {first_piece_at - began:.2f} s, {len(pieces)} pieces in "
          f"{ended - began:.2f} s")

    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=32,
                                           temperature=0)
    assert reply.choices[0].message.content == expected and reply.usage.completion_tokens == local.shape[1] - \
        input_ids.shape[1]
    prompt = "The capital of France is"
    plain = tokenizer(prompt, return_tensors="pt").input_ids
    plain_out = local_model(smollm2_dir).generate(plain, max_new_tokens=16, do_sample=False)
    cont = tokenizer.decode(plain_out[0, plain.shape[1]:], skip_special_tokens=True)
    assert "." in cont
    completion = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16,
                                           temperature=0, stop=["."])
    assert completion.choices[0].text == cont[:cont.index(".")] and completion.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="only n=1 is supported"):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
