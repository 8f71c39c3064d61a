"""Fine-tuning under failures and hostile peers: a server dying mid-step, hostile backward requests."""

from __future__ import annotations

import threading

import pytest
import torch

from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.errors import RemoteError
from jupyter_swarm.wire.messages import pack, unpack
from jupyter_swarm.wire.protocols import MAX_BATCH_TOKENS, RPC
from jupyter_swarm.wire.tensors import encode_tensor
from tests.integration.conftest import start_swarm
from tests.integration.finetune_reference import LocalPrompts, causal_lm_loss, deep_prompt_hooks
from tests.integration.test_bad_input import _error_of, _exchange

HIDDEN = 64
TOL = dict(atol=1e-5, rtol=1e-4)


def _batch(seed: int, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(4, 200, shape, generator=torch.Generator().manual_seed(seed))


def _expected_grads(model, local, batch):
    reference = LocalPrompts(model.tuning)
    loss = causal_lm_loss(reference.logits(local, batch), batch)
    return loss, torch.autograd.grad(loss, list(reference.parameters()))


def test_server_killed_between_forward_and_backward_gives_exact_gradients(model_path, connect, local_model):
    path = model_path("llama")
    # blocks 2-3: two servers, so the one the forward pass used can die before the backward pass reaches it
    with start_swarm(path, [(0, 2), (2, 4), (2, 4)]) as swarm:
        model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=3)
        killed: list[str] = []
        original = model.remote_blocks.abackward

        async def kill_then_backward(trace, grad, prompts):
            if not killed:
                route = next(r for r, _ in trace if r.start == 2)
                server = next(s for s in swarm.servers if s.peer_id == route.peer_id)
                server.kill()
                killed.append(route.peer_id)
            return await original(trace, grad, prompts)

        model.remote_blocks.abackward = kill_then_backward
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step in range(2):  # the second step runs on the survivors only
            for p in trainable:
                p.grad = None
            batch = _batch(seed=step)
            loss = model(batch, labels=batch).loss
            loss.backward()
            expected_loss, expected_grads = _expected_grads(model, local_model(path), batch)
            torch.testing.assert_close(loss.detach(), expected_loss.detach(), **TOL)
            for got, expected in zip(trainable, expected_grads):
                torch.testing.assert_close(got.grad, expected, **TOL)
        assert killed


def test_deep_prompt_generation_survives_a_server_failure(model_path, connect, local_model):
    """The replacement server's cache is rebuilt with the deep prompts the first step carried."""
    from tests.integration.test_failures import _KillMidGeneration

    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4), (2, 4)]) as swarm:
        model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=4)
        with torch.no_grad():
            model.tuning.intermediate_prompts.mul_(20)  # large enough to change the tokens
        prompt = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])
        killer = _KillMidGeneration(model, swarm, block=3, after=6)
        with model.inference_session(max_length=64) as session:
            got = model.generate(prompt, max_new_tokens=20, do_sample=False, streamer=killer)
            assert killer.killed is not None and session.failovers >= 1
        local = local_model(path)
        reference = LocalPrompts(model.tuning)
        with torch.no_grad(), deep_prompt_hooks(local, reference.block_prompts(), first_call_only=True):
            expected = local.generate(inputs_embeds=reference.inputs_embeds(local, prompt), max_new_tokens=20,
                                      do_sample=False)
        with torch.no_grad():
            plain = local.generate(prompt, max_new_tokens=20, do_sample=False)[:, prompt.shape[1]:]
        assert expected.tolist() != plain.tolist()  # the prompts matter, so a replay without them would show
        assert got[:, prompt.shape[1]:].tolist() == expected.tolist()


def _backward(hidden, grad_output, prompts=None, **extra) -> bytes:
    message = {"type": "backward", "hidden": encode_tensor(hidden) if isinstance(hidden, torch.Tensor) else hidden,
               "grad_output": (encode_tensor(grad_output) if isinstance(grad_output, torch.Tensor)
                               else grad_output), **extra}
    if prompts is not None:
        message["prompts"] = encode_tensor(prompts) if isinstance(prompts, torch.Tensor) else prompts
    return pack(message)


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


HOSTILE_BACKWARD = [
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN + 1)), "grad_output shape"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(2, 3, HIDDEN)), "grad_output shape"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN, dtype=torch.float64)), "float32"),
    (_backward(_zeros(1, 3, HIDDEN), torch.full((1, 3, HIDDEN), float("nan"))), "NaN"),
    (_backward(_zeros(1, 3, HIDDEN), torch.full((1, 3, HIDDEN), float("inf"))), "NaN or infinite"),
    (_backward(torch.full((1, 3, HIDDEN), float("nan")), _zeros(1, 3, HIDDEN)), "NaN"),
    (_backward(_zeros(1, 3, HIDDEN), {"dtype": "float32", "shape": [10**9, 10**9, HIDDEN], "data": b""}), "shape"),
    (_backward(_zeros(1, 3, HIDDEN), {"dtype": "float32", "shape": [1, 3, HIDDEN], "data": b"short"}), "bytes"),
    (_backward(_zeros(1, MAX_BATCH_TOKENS + 1, HIDDEN), _zeros(1, MAX_BATCH_TOKENS + 1, HIDDEN)), "exceed"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN), prompts=_zeros(2, 1, 5, HIDDEN)), "prompts must have shape"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN), prompts=_zeros(7, 1, 2, HIDDEN)), "prompts must have shape"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN), prompts=_zeros(2, 1, 2, HIDDEN, dtype=torch.float16)),
     "prompts must be"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN), prompts=torch.full((2, 1, 2, HIDDEN), float("nan"))),
     "prompts contain NaN"),
    (_backward(_zeros(1, 3, HIDDEN), _zeros(1, 3, HIDDEN), start=0, end=4), "not served here"),
    (_backward(_zeros(1, 3, HIDDEN), "not a tensor"), "grad_output: expected a tensor"),
    (pack({"type": "backward", "hidden": encode_tensor(_zeros(1, 3, HIDDEN))}), "lacks the field 'grad_output'"),
]


def test_hostile_backward_requests_get_clear_errors_and_do_not_disturb_training(model_path, connect, local_model):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=3)
        trainable = [p for p in model.parameters() if p.requires_grad]
        node = join_swarm(swarm.initial_peers)
        answers: list = []
        errors: list[BaseException] = []

        def attack() -> None:
            try:
                for _ in range(3):
                    answers.append(_exchange(node, swarm.servers[0].peer_id, RPC, [p for p, _ in HOSTILE_BACKWARD]))
            except BaseException as e:  # noqa: BLE001  (reported below)
                errors.append(e)

        try:
            attacker = threading.Thread(target=attack)
            attacker.start()
            for step in range(3):  # an honest client trains while the attack runs
                for p in trainable:
                    p.grad = None
                batch = _batch(seed=10 + step)
                model(batch, labels=batch).loss.backward()
                _, expected_grads = _expected_grads(model, local_model(path), batch)
                for got, expected in zip(trainable, expected_grads):
                    torch.testing.assert_close(got.grad, expected, **TOL)
            attacker.join(120)
            assert not errors, errors
            assert len(answers) == 3
            for round_answers in answers:
                assert len(round_answers) == len(HOSTILE_BACKWARD)
                for answer, (_, expected) in zip(round_answers, HOSTILE_BACKWARD):
                    assert expected in _error_of(answer), (expected, answer)
            # a well-formed backward request on the same server still works
            good = _exchange(node, swarm.servers[0].peer_id, RPC, [
                _backward(torch.randn(1, 3, HIDDEN), torch.randn(1, 3, HIDDEN), prompts=torch.randn(2, 1, 2, HIDDEN))])
            reply = unpack(good[0], "backward_result")
            assert "grad_hidden" in reply and "grad_prompts" in reply
        finally:
            node.shutdown()
        for server in swarm.servers:
            assert server.process.poll() is None, "".join(server.output)


def test_invalid_backward_is_not_retried_elsewhere(model_path, connect):
    """A request every server would refuse fails at once with the server's explanation."""
    path = model_path("llama")
    with start_swarm(path, [(0, 4)]) as swarm:
        model = connect(path, swarm)
        hidden = torch.randn(1, 4, HIDDEN, requires_grad=True)
        prompts = torch.randn(4, 1, 9, HIDDEN, requires_grad=True)  # pre_seq_len 9 > 4 tokens
        with pytest.raises(RemoteError, match="prompts must have shape"):
            model.remote_blocks(hidden, prompts)
