"""The OpenAI-compatible API's own logic on a local tiny model: stop sequences, request checks, response shapes.

(Through a real swarm with the real model and the `openai` client: tests/integration/test_real_model.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from fastapi.testclient import TestClient  # the test extra installs the api extra: never skip these
from transformers import AutoModelForCausalLM, AutoTokenizer

from jupyter_swarm.api.app import create_app
from jupyter_swarm.api.engine import Engine
from jupyter_swarm.api.stops import StopScanner
from jupyter_swarm.models import make_tiny_model


def test_stop_scanner_holds_back_only_what_could_start_a_stop_sequence() -> None:
    scanner = StopScanner(["END", "\n\n"])
    out = [scanner.feed(p) for p in ["Hello E", "N", "ough. E", "ND more"]]
    assert out == ["Hello ", "", "ENough. ", ""] and scanner.stopped
    assert scanner.finish() == ""
    scanner = StopScanner(["stop"])
    assert scanner.feed("a st") == "a " and scanner.finish() == "st"  # never became a stop: handed out at the end
    scanner = StopScanner([])
    assert scanner.feed("anything") == "anything"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp("api") / "tiny"), num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return TestClient(create_app(Engine(model, tokenizer, "tiny"))), model, tokenizer


def _greedy_text(model, tokenizer, input_ids, n: int) -> str:
    out = model.generate(input_ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def test_models_and_completions(api) -> None:
    client, model, tokenizer = api
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 8,
                                                 "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = _greedy_text(model, tokenizer, tokenizer("Once upon", return_tensors="pt").input_ids, 8)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] > 0


def test_chat_stream_is_server_sent_events_of_the_greedy_text(api) -> None:
    client, model, tokenizer = api
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    with client.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                             "max_tokens": 10, "temperature": 0,
                                                             "stream": True}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    assert text == _greedy_text(model, tokenizer, prompt, 10)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_sequences_cut_the_text(api) -> None:
    client, model, tokenizer = api
    full = _greedy_text(model, tokenizer, tokenizer("Once upon", return_tensors="pt").input_ids, 12)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 12,
                                                 "temperature": 0, "stop": [stop]}).json()
    assert reply["choices"][0]["text"] == full[:full.index(stop)] and reply["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("change, status, words", [
    ({"n": 2}, 400, "only n=1 is supported"),
    ({"logprobs": 3}, 400, "unsupported parameter(s): logprobs"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty other than 0"),
    ({"frobnicate": True}, 400, "unsupported parameter(s): frobnicate"),
    ({"temperature": 5}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ({"model": "gpt-4"}, 404, "does not exist here"),
])
def test_unsupported_requests_get_a_clear_4xx(api, change, status, words) -> None:
    client, _, _ = api
    reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                      "content": "Hi"}], **change})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_presence_penalty_zero_is_accepted(api) -> None:
    client, _, _ = api
    reply = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "presence_penalty": 0,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    assert torch.is_grad_enabled()  # the API never turned autograd off for the process
