"""Bad input from users and hostile peers gets clear errors and never disturbs the server or other sessions."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import torch

from jupyter_swarm import AutoDistributedModelForCausalLM
from jupyter_swarm.client.inference import SessionLengthError
from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.errors import ConfigurationError, MissingBlocksError, PeerUnavailableError, RemoteError
from jupyter_swarm.wire.messages import pack, unpack
from jupyter_swarm.wire.protocols import INFERENCE, MAX_BATCH_TOKENS, RPC
from jupyter_swarm.wire.tensors import encode_tensor
from tests.integration.conftest import start_swarm

PROMPT = torch.tensor([[1, 17, 42, 99, 7]])
HIDDEN = 64


@pytest.fixture(scope="module")
def swarm(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        yield path, swarm


def _exchange(node, peer_id: str, protocol: str, payloads: list[bytes]) -> list[bytes | str]:
    """Send raw frames on one stream; collect each answer (or the error that ended the stream)."""

    async def run():
        stream = await node.open_stream(peer_id, protocol)
        answers = []
        try:
            for payload in payloads:
                await stream.send(payload)
                answers.append(await stream.recv())
        except PeerUnavailableError as e:
            answers.append(f"closed: {e}")
        finally:
            await stream.close()
        return answers

    return node.call(run)


def _error_of(reply: bytes) -> str:
    with pytest.raises(RemoteError) as info:
        unpack(reply)
    return str(info.value)


HOSTILE_RPC = [
    (b"\xc1\xff garbage", "not valid msgpack"),
    (msgpack.packb([1, 2, 3]), "must be a map"),
    (pack({"type": "launch_missiles"}), "expected a message of type"),
    (pack({"type": "forward"}), "lacks the field 'hidden'"),
    (pack({"type": "forward", "hidden": encode_tensor(torch.zeros(1, 3, HIDDEN + 1))}), "must have shape"),
    (pack({"type": "forward", "hidden": encode_tensor(torch.zeros(1, 3, HIDDEN, dtype=torch.float64))}), "float32"),
    (pack({"type": "forward", "hidden": encode_tensor(torch.full((1, 3, HIDDEN), float("nan")))}), "NaN"),
    (pack({"type": "forward", "hidden": {"dtype": "float32", "shape": [1, 3, HIDDEN], "data": b"short"}}), "bytes"),
    (pack({"type": "forward", "hidden": {"dtype": "float32", "shape": [10**9, 10**9], "data": b""}}), "shape"),
    (pack({"type": "forward", "hidden": encode_tensor(torch.zeros(1, MAX_BATCH_TOKENS + 1, HIDDEN))}), "exceed"),
    (pack({"type": "forward", "start": 0, "end": 4, "hidden": encode_tensor(torch.zeros(1, 3, HIDDEN))}),
     "not served here"),
    (pack({"type": "backward", "hidden": encode_tensor(torch.zeros(1, 3, HIDDEN)),
           "grad_output": encode_tensor(torch.zeros(1, 4, HIDDEN))}), "grad_output shape"),
    (pack({"type": "forward", "compression": "zip", "hidden": encode_tensor(torch.zeros(1, 3, HIDDEN))}),
     "unknown compression"),
]


def test_hostile_rpc_requests_get_clear_errors_and_the_server_keeps_serving(swarm, connect, local_model):
    path, local_swarm = swarm
    node = join_swarm(local_swarm.initial_peers)
    try:
        server = local_swarm.servers[0].peer_id
        answers = _exchange(node, server, RPC, [payload for payload, _ in HOSTILE_RPC])
        assert len(answers) == len(HOSTILE_RPC)
        for answer, (_, expected) in zip(answers, HOSTILE_RPC):
            assert expected in _error_of(answer)
        # an oversized frame header is refused with a reason, and only that stream is dropped
        async def oversized():
            stream = await node.open_stream(server, RPC)
            await stream._stream.write((2**32 - 1).to_bytes(4, "big"))
            reply = await stream.recv()
            with pytest.raises(PeerUnavailableError):
                await stream.recv()
            return reply
        assert "4294967295-byte message, over the" in _error_of(node.call(oversized))
    finally:
        node.shutdown()
    for server in local_swarm.servers:
        assert server.process.poll() is None, "".join(server.output)
    model = connect(path, local_swarm)
    expected = local_model(path).generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert model.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


def test_hostile_session_steps_do_not_disturb_a_concurrent_session(swarm, connect, local_model):
    path, local_swarm = swarm
    model = connect(path, local_swarm)
    node = join_swarm(local_swarm.initial_peers)
    try:
        server = local_swarm.servers[0].peer_id
        good_step = pack({"type": "step", "position": 0, "hidden": encode_tensor(torch.zeros(1, 2, HIDDEN))})
        with model.inference_session(max_length=32):
            first = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
            answers = _exchange(node, server, INFERENCE, [
                pack({"type": "open", "max_length": 4, "batch_size": 1}),
                pack({"type": "step", "position": 5, "hidden": encode_tensor(torch.zeros(1, 2, HIDDEN))}),
                pack({"type": "step", "position": 0, "hidden": encode_tensor(torch.zeros(2, 2, HIDDEN))}),
                pack({"type": "step", "position": 0, "hidden": encode_tensor(torch.zeros(1, 5, HIDDEN))}),
                pack({"type": "step", "position": 0, "hidden": encode_tensor(torch.zeros(1, 2, HIDDEN)),
                      "beam_idx": encode_tensor(torch.tensor([7]))}),
                good_step,
            ])
            second = model.generate(torch.tensor([[21, 22]]), max_new_tokens=4, do_sample=False)
        assert unpack(answers[0], "opened")
        assert "cache holds 0 tokens" in _error_of(answers[1])
        assert "opened for batch 1" in _error_of(answers[2])
        assert "exceed its max_length 4" in _error_of(answers[3])
        assert "beam_idx must be" in _error_of(answers[4])
        assert unpack(answers[5], "output")["position"] == 2  # the session still works after the bad steps
        refused = _exchange(node, server, INFERENCE, [pack({"type": "open", "max_length": 10**9, "batch_size": 1})])
        assert "max_length must be in" in _error_of(refused[0])
    finally:
        node.shutdown()
    expected = local_model(path).generate(torch.cat([first, torch.tensor([[21, 22]])], 1), max_new_tokens=4,
                                          do_sample=False)
    assert torch.cat([first, second], 1).tolist() == expected.tolist()


def test_session_longer_than_its_max_length_is_refused(swarm, connect):
    path, local_swarm = swarm
    model = connect(path, local_swarm)
    with model.inference_session(max_length=6):
        with pytest.raises(SessionLengthError, match="max_length is 6"):
            model.generate(PROMPT, max_new_tokens=8, do_sample=False)


def test_missing_blocks_are_named(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 2)]) as partial:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=partial.initial_peers,
                                                                wait_for_coverage=1.0)
        try:
            with pytest.raises(MissingBlocksError, match=r"blocks 2-3 \(1 server\(s\) online\)") as info:
                model.generate(PROMPT, max_new_tokens=2)
            assert info.value.missing == [2, 3]
        finally:
            model.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jupyter_swarm.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_arguments_give_clear_errors(model_path, tmp_path):
    path = model_path("llama")
    out = _cli("serve", path, "--new-swarm", "--blocks", "2:9")
    assert out.returncode == 2 and "it has 4 blocks" in out.stderr
    out = _cli("serve", path, "--new-swarm", "--blocks", "two")
    assert out.returncode == 2 and "START:END" in out.stderr
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    out = _cli("serve", str(tmp_path), "--new-swarm")
    assert out.returncode == 2 and "bert" in out.stderr
    out = _cli("serve", str(tmp_path / "nowhere"), "--new-swarm")
    assert out.returncode == 2 and "nowhere" in out.stderr
    out = _cli("status", "--initial-peers", "not-an-address")
    assert out.returncode == 2 and "does not parse" in out.stderr
    out = _cli("status", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWPGiD9iUYEr3m9cN1X7aEKHdfpsV8RrNK9Sm13qrwaetW")
    assert out.returncode == 2 and "could not reach peer" in out.stderr
    for text in (out.stdout, out.stderr):
        assert "Traceback" not in text


def test_client_bad_arguments(model_path):
    path = model_path("llama")
    with pytest.raises(ConfigurationError, match="initial_peers is empty"):
        AutoDistributedModelForCausalLM.from_pretrained(path)
    with pytest.raises(ConfigurationError, match="unknown compression 'zip'; choose one of none, float16"):
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=["/ip4/127.0.0.1/tcp/1"],
                                                        compression="zip")
