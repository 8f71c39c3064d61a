"""Fine-tuning through the swarm: gradients of prompts (and a score head) equal local autograd on the same weights."""

from __future__ import annotations

import pytest
import torch

from jupyter_swarm import AutoDistributedModelForSequenceClassification
from jupyter_swarm.errors import ConfigurationError
from tests.integration.conftest import start_swarm
from tests.integration.finetune_reference import LocalPrompts, causal_lm_loss, deep_prompt_hooks

PRE_SEQ_LEN = 5
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=["llama", "bloom"])
def two_server_swarm(request, model_path):
    path = model_path(request.param)
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        yield path, swarm


def _batch(seed: int = 0, shape: tuple[int, int] = (3, 10)) -> torch.Tensor:
    return torch.randint(4, 200, shape, generator=torch.Generator().manual_seed(seed))


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_match_local_autograd(two_server_swarm, connect, local_model, mode):
    path, swarm = two_server_swarm
    model = connect(path, swarm, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN)
    trainable = _trainable(model)
    assert [tuple(p.shape) for p in trainable] == (
        [(PRE_SEQ_LEN, 64)] if mode == "ptune" else [(PRE_SEQ_LEN, 64), (3, PRE_SEQ_LEN, 64)])
    local = local_model(path)
    reference = LocalPrompts(model.tuning)
    batch = _batch()

    out = model(batch, labels=batch)
    assert out.logits.shape == (3, 10, model.config.vocab_size)  # only the real tokens
    out.loss.backward()

    expected_logits = reference.logits(local, batch)
    expected_loss = causal_lm_loss(expected_logits, batch)
    expected_grads = torch.autograd.grad(expected_loss, list(reference.parameters()))
    torch.testing.assert_close(out.logits.detach(), expected_logits.detach(), **TOL)
    torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), **TOL)
    assert len(expected_grads) == len(trainable)
    for got, expected in zip(trainable, expected_grads):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got.grad, expected, **TOL)


def test_training_steps_reduce_the_loss_and_touch_only_the_prompts(two_server_swarm, connect):
    path, swarm = two_server_swarm
    model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=4)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(_trainable(model), lr=3e-2)
    batch = _batch(seed=1, shape=(2, 8))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generation_with_prompts_matches_local(two_server_swarm, connect, local_model, mode):
    path, swarm = two_server_swarm
    model = connect(path, swarm, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN)
    local = local_model(path)
    reference = LocalPrompts(model.tuning)
    prompt = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])
    got = model.generate(prompt, max_new_tokens=12, do_sample=False)
    with torch.no_grad(), deep_prompt_hooks(local, reference.block_prompts(), first_call_only=True):
        expected = local.generate(inputs_embeds=reference.inputs_embeds(local, prompt), max_new_tokens=12,
                                  do_sample=False)
    assert got.shape == (1, prompt.shape[1] + 12)
    assert got[:, prompt.shape[1]:].tolist() == expected.tolist()


def test_sequence_classification_matches_local(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, initial_peers=swarm.initial_peers, num_labels=3, tuning_mode="ptune", pre_seq_len=3)
    try:
        local = local_model(path)
        reference = LocalPrompts(model.tuning)
        score = torch.nn.Linear(64, 3, bias=False)
        score.weight.data.copy_(model.score.weight.detach())
        batch, labels = _batch(seed=2, shape=(4, 9)), torch.tensor([0, 2, 1, 2])

        out = model(batch, labels=labels)
        assert out.logits.shape == (4, 3)
        out.loss.backward()

        expected_logits = score(reference.hidden(local, batch)[:, -1])
        expected_loss = torch.nn.functional.cross_entropy(expected_logits, labels)
        params = [score.weight, *reference.parameters()]
        expected_grads = torch.autograd.grad(expected_loss, params)
        torch.testing.assert_close(out.logits.detach(), expected_logits.detach(), **TOL)
        torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), **TOL)
        got_grads = [model.score.weight.grad, model.tuning.prompt_embeddings.grad]
        for got, expected in zip(got_grads, expected_grads):
            torch.testing.assert_close(got, expected, **TOL)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "score.weight", "tuning.prompt_embeddings"}
        with pytest.raises(ConfigurationError, match="does not generate"):
            model.generate(batch)
    finally:
        model.close()


def test_bad_tuning_arguments_are_refused(model_path):
    path = model_path("llama")
    peers = ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWPGiD9iUYEr3m9cN1X7aEKHdfpsV8RrNK9Sm13qrwaetW"]
    from jupyter_swarm import AutoDistributedModelForCausalLM
    with pytest.raises(ConfigurationError, match="tuning_mode must be one of"):
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, tuning_mode="lora", pre_seq_len=2)
    with pytest.raises(ConfigurationError, match="pre_seq_len >= 1"):
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, tuning_mode="ptune")
    with pytest.raises(ConfigurationError, match="pre_seq_len needs tuning_mode"):
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, pre_seq_len=4)


LOCAL_EMBEDDINGS = {"llama": "embed_tokens", "bloom": "word_embeddings"}


def test_client_lora_gradients_match_local_autograd(two_server_swarm, connect, model_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    from jupyter_swarm.client.lora import add_client_lora

    path, swarm = two_server_swarm
    model = connect(path, swarm, tuning_mode="ptune", pre_seq_len=3)
    added = add_client_lora(model, r=4, lora_alpha=8)
    assert len(added) == 4
    torch.manual_seed(0)
    with torch.no_grad():
        for p in added:  # peft starts B at zero; random values make every gradient non-trivial
            p.normal_(0.0, 0.1)
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 5  # 4 LoRA matrices + the prompts

    local = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    family = model.head.family.name
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=[LOCAL_EMBEDDINGS[family], "lm_head"]), local)
    local_lora = {name: p for name, p in local.named_parameters() if "lora_" in name}
    pairs = []
    for name, p in names.items():
        if "lora_" not in name:
            continue
        part, suffix = name.removeprefix("head.").split(".", 1)
        local_name = next(n for n in local_lora if n.endswith(suffix) and
                          (LOCAL_EMBEDDINGS[family] if part == "embeddings" else "lm_head") in n)
        with torch.no_grad():
            local_lora[local_name].copy_(p)
        pairs.append((p, local_lora[local_name]))

    batch = _batch(seed=3)
    out = model(batch, labels=batch)
    out.loss.backward()
    reference = LocalPrompts(model.tuning)
    expected_loss = causal_lm_loss(reference.logits(local, batch), batch)
    local_params = [lp for _, lp in pairs] + [reference.prompt_embeddings]
    expected_grads = torch.autograd.grad(expected_loss, local_params)
    torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), **TOL)
    got_grads = [p.grad for p, _ in pairs] + [model.tuning.prompt_embeddings.grad]
    for got, expected in zip(got_grads, expected_grads):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, **TOL)


def test_batches_go_as_concurrent_chunks_with_exact_gradients(two_server_swarm, connect, local_model):
    path, swarm = two_server_swarm
    model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=2)
    model.max_chunk_tokens = 24  # 2 rows of 2 + 9 tokens per request: 3 chunks for 5 rows
    local = local_model(path)
    reference = LocalPrompts(model.tuning)
    batch = _batch(seed=4, shape=(5, 9))
    out = model(batch, labels=batch)
    out.loss.backward()
    expected_loss = causal_lm_loss(reference.logits(local, batch), batch)
    expected_grads = torch.autograd.grad(expected_loss, list(reference.parameters()))
    torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), **TOL)
    for got, expected in zip(_trainable(model), expected_grads):
        torch.testing.assert_close(got.grad, expected, **TOL)


def test_batch_over_the_servers_token_limit_is_split(two_server_swarm, connect, local_model):
    from jupyter_swarm.wire.protocols import MAX_BATCH_TOKENS

    path, swarm = two_server_swarm
    model = connect(path, swarm, tuning_mode="ptune", pre_seq_len=2)
    batch = _batch(seed=5, shape=(40, 420))
    assert batch.numel() > MAX_BATCH_TOKENS  # one request would be refused
    out = model(batch, labels=batch)
    out.loss.backward()
    reference = LocalPrompts(model.tuning)
    expected_loss = causal_lm_loss(reference.logits(local_model(path), batch), batch)
    (expected_grad,) = torch.autograd.grad(expected_loss, [reference.prompt_embeddings])
    torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), **TOL)
    torch.testing.assert_close(model.tuning.prompt_embeddings.grad, expected_grad, **TOL)
