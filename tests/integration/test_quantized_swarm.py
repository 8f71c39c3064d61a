"""Quantized servers (bitsandbytes nf4 and int8) in a real swarm compute what transformers' own model computes when
quantized the same way: logits, generated tokens, prompt gradients, server-hosted LoRA adapters; clients route by
the quant types they allow, and `status` shows each server's. Each inference session picks how its activations
travel (none, float16, bfloat16, 8-bit blockwise)."""

from __future__ import annotations

import pytest
import torch

from jupyter_swarm.client.status import format_status, read_swarm_status
from jupyter_swarm.errors import MissingBlocksError
from jupyter_swarm.local_swarm import LocalSwarm
from jupyter_swarm.models.quantization import load_reference_model
from jupyter_swarm.wire.tensors import Compression
from tests.integration.conftest import SERVER_ARGS
from tests.integration.finetune_reference import LocalPrompts, causal_lm_loss

peft = pytest.importorskip("peft")

#: the swarm runs the very same bitsandbytes layers as the reference; what differs is summation order across
#: processes and chunks (measured: at most 2e-6 on logits of magnitude 1)
TOL = dict(atol=2e-5, rtol=1e-4)
ADAPTER = "tiny-lora"


@pytest.fixture(scope="module")
def quant_swarm(model_path, tmp_path_factory):
    """nf4 servers for blocks 0-1 and 2-3 (a relayed chain), an int8 server for blocks 0-3; all host a LoRA adapter."""
    from transformers import AutoModelForCausalLM

    path = model_path("llama")
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(11)
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)  # peft starts B at zero; random values make the adapter change the outputs
    adapter_dir = str(tmp_path_factory.mktemp("quant-adapter"))
    adapted.save_pretrained(adapter_dir)
    args = [*SERVER_ARGS, "--adapters", f"{ADAPTER}={adapter_dir}"]
    with LocalSwarm(path, [(0, 2)], extra_args=args, quant_type="nf4") as swarm:
        joining = [swarm.add_server(2, 4, wait=False), swarm.add_server(0, 4, wait=False, quant_type="int8")]
        for server in joining:
            server.wait_ready()
        quant_types = {s.peer_id: q for s, q in zip(swarm.servers, ["nf4", "nf4", "int8"])}
        yield path, swarm, adapter_dir, quant_types


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_logits_and_tokens_equal_a_local_model_quantized_the_same_way(quant_swarm, connect, quant_type):
    path, swarm, _, quant_types = quant_swarm
    reference = load_reference_model(path, quant_type)
    model = connect(path, swarm, allowed_quant_types=[quant_type])
    batch = _batch(0)
    with torch.no_grad():
        expected_logits = reference(batch).logits
        torch.testing.assert_close(model(batch).logits, expected_logits, **TOL)
        float_logits = load_reference_model(path, "none")(batch).logits
    assert (expected_logits - float_logits).abs().max() > 100 * TOL["atol"]  # the blocks do change when quantized
    prompt = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])
    expected = reference.generate(input_ids=prompt, max_new_tokens=10, do_sample=False)
    with model.inference_session(max_length=32) as session:
        assert model.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()
        assert {quant_types[r.peer_id] for r in session.routes} == {quant_type}
        assert len(session.routes) == (2 if quant_type == "nf4" else 1)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_prompt_gradients_through_quantized_blocks_equal_local_ones(quant_swarm, connect, quant_type):
    """Run after generation (the servers have taken inference steps), as a server's backward requests usually are."""
    path, swarm, _, _ = quant_swarm
    model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=3, allowed_quant_types=[quant_type])
    local = load_reference_model(path, quant_type)
    prompts = LocalPrompts(model.tuning)
    for seed in (1, 2):
        for p in model.parameters():
            p.grad = None
        batch = _batch(seed)
        loss = model(batch, labels=batch).loss
        loss.backward()
        expected_loss = causal_lm_loss(prompts.logits(local, batch), batch)
        expected = torch.autograd.grad(expected_loss, list(prompts.parameters()))
        torch.testing.assert_close(loss.detach(), expected_loss.detach(), **TOL)
        for got, want in zip([p for p in model.parameters() if p.requires_grad], expected):
            assert want.abs().max() > 0
            torch.testing.assert_close(got.grad, want, **TOL)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_lora_adapters_on_quantized_blocks_equal_peft_on_the_quantized_model(quant_swarm, connect, quant_type):
    path, swarm, adapter_dir, _ = quant_swarm
    local = peft.PeftModel.from_pretrained(load_reference_model(path, quant_type), adapter_dir).eval()
    model = connect(path, swarm, active_adapter=ADAPTER, allowed_quant_types=[quant_type])
    batch = _batch(3)
    with torch.no_grad():
        expected = local(input_ids=batch).logits
        with local.disable_adapter():
            plain = local(input_ids=batch).logits
        assert (expected - plain).abs().max() > 0.1
        torch.testing.assert_close(model(batch).logits, expected, **TOL)


def test_no_server_of_an_allowed_quant_type_is_a_clear_error_and_status_shows_quant_types(quant_swarm, connect):
    path, swarm, _, quant_types = quant_swarm
    model = connect(path, swarm, allowed_quant_types=["fp4", "none"], wait_for_coverage=0.5)
    with pytest.raises(MissingBlocksError, match="no online server of quant type fp4 or none covers blocks 0-3; "
                                                 "servers of quant type int8, nf4 do"):
        model(_batch(0))
    status = read_swarm_status(swarm.initial_peers[:1])
    assert {r.peer_id: r.quant_type for r in status["llama"].servers.values()} == quant_types
    table = format_status(status)
    for peer, quant_type in quant_types.items():
        assert f"{peer}  blocks" in table and f"float32 {quant_type}" in table.split(peer)[1].splitlines()[0]


def test_each_session_chooses_how_its_activations_travel(quant_swarm, connect):
    """Relayed steps through the two nf4 servers: every hop's error grows with the compression's, none is exact."""
    path, swarm, _, _ = quant_swarm
    model = connect(path, swarm, allowed_quant_types=["nf4"])
    steps = [model.head.embed(ids) for ids in (torch.tensor([[1, 17, 42, 99, 7]]), torch.tensor([[230]]))]
    outputs = {}
    for compression in Compression:
        with model.inference_session(max_length=8, compression=compression.value) as session:
            outputs[compression] = torch.cat([session.step(hidden) for hidden in steps], dim=1)
            assert session.compression == compression and len(session.routes) == 2
    assert model.compression == Compression.NONE  # a session's choice is its own
    exact = outputs[Compression.NONE]
    errors = {c: float((out - exact).norm() / exact.norm()) for c, out in outputs.items()}
    assert errors[Compression.NONE] == 0.0
    assert 0 < errors[Compression.FLOAT16] < errors[Compression.BFLOAT16] < errors[Compression.BLOCKWISE_8BIT] < 0.05
    batch = _batch(4)
    with torch.no_grad():
        plain = model(batch).logits
        model.compression = "bfloat16"  # forward and backward requests: the model's setting
        squeezed = model(batch).logits
    assert 0 < (squeezed - plain).abs().max() < 0.05 * plain.abs().max()
