"""Servers host named LoRA adapters (`serve --adapters`); a client picks one and routing uses only servers with it."""

from __future__ import annotations

import pytest
import torch

from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.errors import MissingBlocksError
from jupyter_swarm.local_swarm import LocalSwarm
from jupyter_swarm.wire.messages import pack
from jupyter_swarm.wire.protocols import RPC
from jupyter_swarm.wire.tensors import encode_tensor
from tests.integration.conftest import SERVER_ARGS
from tests.integration.finetune_reference import LocalPrompts, causal_lm_loss
from tests.integration.test_bad_input import _error_of, _exchange

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-4)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bloom": ["query_key_value", "dense_4h_to_h"]}
NAME = "tiny-lora"


@pytest.fixture(scope="module", params=["llama", "bloom"])
def adapter_swarm(request, model_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = model_path(request.param)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(7)
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[request.param]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)  # peft starts B at zero; random values make the adapter change the outputs
    adapter_dir = tmp_path_factory.mktemp(f"adapter-{request.param}")
    adapted.save_pretrained(str(adapter_dir))
    adapted.eval().requires_grad_(False)
    hosting = ["--adapters", f"{NAME}={adapter_dir}"]
    # blocks 0-1 and 2-3 host the adapter; the server for 0-3 does not, so an adapter route must avoid it
    with LocalSwarm(path, [(0, 4)], extra_args=SERVER_ARGS) as swarm:
        plain = swarm.servers[0]
        swarm.add_server(0, 2, extra_args=hosting)
        swarm.add_server(2, 4, extra_args=hosting)
        yield path, swarm, adapted, plain


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_adapter_forward_and_prompt_gradients_match_local_peft_model(adapter_swarm, connect):
    path, swarm, adapted, plain = adapter_swarm
    model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=3, active_adapter=NAME)
    local = adapted.get_base_model()
    reference = LocalPrompts(model.tuning)
    for seed in range(3):  # several requests, so a route through the plain server would show
        for p in model.parameters():
            p.grad = None
        batch = _batch(seed)
        out = model(batch, labels=batch)
        out.loss.backward()
        expected_loss = causal_lm_loss(reference.logits(local, batch), batch)
        expected = torch.autograd.grad(expected_loss, list(reference.parameters()))
        torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), **TOL)
        for got, want in zip([p for p in model.parameters() if p.requires_grad], expected):
            torch.testing.assert_close(got.grad, want, **TOL)


def test_adapter_generation_matches_local_and_avoids_servers_without_it(adapter_swarm, connect):
    path, swarm, adapted, plain = adapter_swarm
    prompt = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])
    with torch.no_grad():
        expected = adapted.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
        with adapted.disable_adapter():
            expected_plain = adapted.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    assert expected.tolist() != expected_plain.tolist()
    model = connect(path, swarm, active_adapter=NAME)
    for _ in range(2):
        with model.inference_session(max_length=32) as session:
            got = model.generate(prompt, max_new_tokens=12, do_sample=False)
            assert plain.peer_id not in {r.peer_id for r in session.routes}
        assert got.tolist() == expected.tolist()
    model.use_adapter(None)  # the same client, now the plain blocks (any server)
    assert model.generate(prompt, max_new_tokens=12, do_sample=False).tolist() == expected_plain.tolist()


def test_unknown_adapter_is_refused(adapter_swarm, connect):
    path, swarm, adapted, plain = adapter_swarm
    model = connect(path, swarm, active_adapter="nope", wait_for_coverage=1.0)
    with pytest.raises(MissingBlocksError):
        model(_batch(0))
    node = join_swarm(swarm.initial_peers)
    try:
        answers = _exchange(node, swarm.servers[1].peer_id, RPC, [  # a server hosting the adapter
            pack({"type": "forward", "active_adapter": "nope", "hidden": encode_tensor(torch.zeros(1, 3, 64))}),
            pack({"type": "forward", "active_adapter": 5, "hidden": encode_tensor(torch.zeros(1, 3, 64))})])
        assert f"adapter 'nope' is not served here (this server hosts: {NAME})" in _error_of(answers[0])
        assert "active_adapter" in _error_of(answers[1])
    finally:
        node.shutdown()
