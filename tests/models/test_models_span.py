"""BlockSpan and SpanCache agree with transformers' own models: chaining, caching, beams, prompts, gradients."""

from __future__ import annotations

import pytest
import torch

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import BlockSpan, ClientHead, SessionLengthError

ALL_FAMILIES = ["llama", "llama-tied", "bloom", "mistral", "qwen2"]
TIGHT = dict(atol=1e-5, rtol=1e-5)
# incremental decoding sums attention in another order than a full forward does
CACHED = dict(atol=5e-5, rtol=1e-4)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 400, (batch, length), generator=torch.Generator().manual_seed(seed))


def _spans(path: str, cuts: list[int]) -> list[BlockSpan]:
    return [BlockSpan.load(path, a, b) for a, b in zip(cuts, cuts[1:])]


def _chain(spans: list[BlockSpan], hidden: torch.Tensor, caches=None) -> torch.Tensor:
    for i, span in enumerate(spans):
        hidden = span(hidden, caches[i] if caches else None)
    return hidden


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_spans_chained_equal_the_whole_model(name, tiny, reference, layers_io):
    path = tiny(name)
    model = reference(path)
    ids = _ids(2, 9)
    spans = _spans(path, [0, 1, 3, 4])
    head = ClientHead.load(path)
    with torch.no_grad():
        block_input, block_output = layers_io(model, ids, 0, 4)
        torch.testing.assert_close(head.embed(ids), block_input, **TIGHT)
        hidden = _chain(spans, head.embed(ids))
        torch.testing.assert_close(hidden, block_output, **TIGHT)  # last hidden state before the final norm
        torch.testing.assert_close(head.logits(hidden), model(ids).logits, **TIGHT)


@pytest.mark.parametrize("name", ["llama", "bloom", "mistral", "qwen2"])
def test_incremental_decoding_equals_full_forward(name, tiny, reference):
    """Prefill, a chunk, then token by token, batch 2, past the sliding window of mistral/qwen2 (4 tokens)."""
    path = tiny(name)
    model = reference(path)
    ids = _ids(2, 11, seed=1)
    spans = _spans(path, [0, 2, 4])
    head = ClientHead.load(path)
    caches = [span.new_cache(batch_size=2, max_length=16) for span in spans]
    with torch.no_grad():
        for a, b in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11)]:
            logits = head.logits(_chain(spans, head.embed(ids[:, a:b]), caches))
            torch.testing.assert_close(logits, model(ids[:, :b]).logits[:, a:b], **CACHED)
            assert [cache.length for cache in caches] == [b, b]


def test_positions_matter(tiny):
    """Guards the tests above: the same token at another position gives another output."""
    path = tiny("llama")
    span = BlockSpan.load(path, 0, 4)
    hidden = ClientHead.load(path).embed(_ids(1, 6))
    with torch.no_grad():
        cache = span.new_cache(1, 8)
        span(hidden[:, :5], cache)
        at_5 = span(hidden[:, 5:], cache)
        at_0 = span(hidden[:, 5:])
    assert (at_5 - at_0).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_reorder_equals_running_permuted_inputs(name, tiny):
    path = tiny(name)
    spans = _spans(path, [0, 3, 4])
    head = ClientHead.load(path)
    prefix, step = _ids(3, 6, seed=2), _ids(3, 1, seed=3)
    beam_idx = torch.tensor([2, 0, 0])
    with torch.no_grad():
        caches = [span.new_cache(3, 10) for span in spans]
        _chain(spans, head.embed(prefix), caches)
        for cache in caches:
            cache.reorder(beam_idx)
        reordered = _chain(spans, head.embed(step), caches)
        expected = _chain(spans, head.embed(torch.cat([prefix[beam_idx], step], dim=1)))[:, -1:]
    torch.testing.assert_close(reordered, expected, **CACHED)


def test_reorder_rejects_bad_indices(tiny):
    span = BlockSpan.load(tiny("llama"), 0, 1)
    cache = span.new_cache(2, 4)
    with pytest.raises(ConfigurationError, match="2 row indices"):
        cache.reorder(torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigurationError, match=r"\[0, 2\)"):
        cache.reorder(torch.tensor([0, 2]))


def test_cache_overflow_raises_session_length_error(tiny):
    span = BlockSpan.load(tiny("llama"), 0, 2)
    hidden = torch.randn(1, 5, span.hidden_size)
    cache = span.new_cache(batch_size=1, max_length=6)
    with torch.no_grad():
        span(hidden, cache)
        with pytest.raises(SessionLengthError, match="limit of 6 tokens"):
            span(hidden[:, :2], cache)
        assert cache.length == 5  # nothing was run, the session goes on
        span(hidden[:, :1], cache)
    assert cache.length == 6
    assert isinstance(SessionLengthError("x"), ConfigurationError)


def test_cache_must_match_batch_and_span(tiny):
    path = tiny("llama")
    first, second = BlockSpan.load(path, 0, 2), BlockSpan.load(path, 2, 4)
    with torch.no_grad():
        with pytest.raises(ConfigurationError, match="batch of 2"):
            first(torch.randn(3, 1, first.hidden_size), first.new_cache(2, 4))
        with pytest.raises(ConfigurationError, match="blocks 0:2"):
            second(torch.randn(1, 1, first.hidden_size), first.new_cache(1, 4))
        with pytest.raises(ConfigurationError, match=r"\[batch, seq, 64\]"):
            first(torch.randn(1, 1, 32))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_cache_bytes_match_a_full_cache(name, tiny):
    span = BlockSpan.load(tiny(name), 1, 3)
    cache = span.new_cache(batch_size=3, max_length=7)
    with torch.no_grad():
        span(torch.randn(3, 7, span.hidden_size), cache)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.hf_cache.layers)
    if name == "llama":  # 2 blocks x (K and V) x batch 3 x 2 kv heads x head_dim 16 x 7 tokens x 4 bytes
        assert span.cache_bytes(3, 7) == 2 * 2 * 3 * 2 * 16 * 7 * 4
        assert held == span.cache_bytes(3, 7)
    else:  # qwen2: block 1 holds all 7 tokens, block 2 slides over a window of 4 (it keeps window - 1)
        assert span.cache_bytes(3, 7) == 2 * 3 * 2 * 16 * (7 + 4) * 4
        assert held <= span.cache_bytes(3, 7)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_prompts_are_added_before_each_block(name, tiny):
    path = tiny(name)
    span = BlockSpan.load(path, 1, 4)
    singles = [BlockSpan.load(path, i, i + 1) for i in range(1, 4)]
    hidden = torch.randn(2, 5, span.hidden_size)
    prompts = torch.randn(3, 1, 2, span.hidden_size) * 0.5
    with torch.no_grad():
        expected = hidden
        for i, single in enumerate(singles):
            expected = single(torch.cat([expected[:, :2] + prompts[i], expected[:, 2:]], dim=1))
        torch.testing.assert_close(span(hidden, prompts=prompts), expected, **TIGHT)
        cache = span.new_cache(2, 8)
        torch.testing.assert_close(span(hidden, cache, prompts=prompts), expected, **TIGHT)
        step = torch.randn(2, 1, span.hidden_size)
        # past position 0 the prompts are already in the cache, so they are ignored
        with_prompts = span(step, cache, prompts=prompts)
        cache2 = span.new_cache(2, 8)
        span(hidden, cache2, prompts=prompts)
        torch.testing.assert_close(with_prompts, span(step, cache2), **TIGHT)
        with pytest.raises(ConfigurationError, match="prompts must have shape"):
            span(hidden, prompts=prompts[:2])


@pytest.mark.parametrize("name", ["llama", "bloom", "qwen2"])
def test_gradients_equal_those_through_transformers_layers(name, tiny, reference, layers_io):
    path = tiny(name)
    model = reference(path)
    ids = _ids(2, 7, seed=4)
    span = BlockSpan.load(path, 0, 4)
    assert not any(p.requires_grad for p in span.parameters())
    weights = torch.randn(2, 7, span.hidden_size)

    start = torch.randn(2, 7, span.hidden_size, requires_grad=True)
    (span(start) * weights).sum().backward()

    ref_start = start.detach().clone().requires_grad_(True)
    _, ref_output = layers_io(model, ids, 0, 4, replace_input=ref_start)
    (ref_output * weights).sum().backward()
    torch.testing.assert_close(start.grad, ref_start.grad, atol=1e-5, rtol=1e-4)


def test_gradients_reach_prompts_and_flow_through_a_cache(tiny):
    span = BlockSpan.load(tiny("llama"), 0, 2)
    hidden = torch.randn(1, 4, span.hidden_size, requires_grad=True)
    prompts = torch.zeros(2, 1, 2, span.hidden_size, requires_grad=True)
    cache = span.new_cache(1, 6)
    prefix = span(hidden, cache, prompts=prompts)
    step = span(torch.randn(1, 1, span.hidden_size), cache)
    (prefix.sum() + step.sum()).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert hidden.grad is not None and hidden.grad[:, 2:].abs().sum() > 0


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_a_cache_cropped_back_continues_as_if_the_dropped_tokens_never_came(name, tiny, reference):
    """Speculative decoding steps back: 3 wrong tokens in, crop them, send the right ones."""
    path = tiny(name)
    model = reference(path)
    ids, wrong = _ids(1, 7, seed=4), _ids(1, 3, seed=5)
    spans = _spans(path, [0, 2, 4])
    head = ClientHead.load(path)
    caches = [span.new_cache(batch_size=1, max_length=8) for span in spans]
    with torch.no_grad():
        _chain(spans, head.embed(ids[:, :2]), caches)
        _chain(spans, head.embed(wrong), caches)
        for cache in caches:
            cache.crop(2)
        assert [cache.length for cache in caches] == [2, 2]
        logits = head.logits(_chain(spans, head.embed(ids[:, 2:]), caches))  # 2 + 5 tokens: fits max_length 8
        torch.testing.assert_close(logits, model(ids).logits[:, 2:], **CACHED)
        for cache in caches:
            with pytest.raises(ConfigurationError, match="must be in 0..7"):
                cache.crop(8)


def test_a_sliding_window_cache_cannot_step_back_past_its_window(tiny):
    path = tiny("mistral")  # window of 4 tokens on every layer
    span = BlockSpan.load(path, 0, 4)
    cache = span.new_cache(batch_size=1, max_length=16)
    with torch.no_grad():
        span(ClientHead.load(path).embed(_ids(1, 9)), cache)
        with pytest.raises(ConfigurationError, match="cannot step back to position 2"):
            cache.crop(2)
        with pytest.raises(ConfigurationError, match="unusable"):
            span(ClientHead.load(path).embed(_ids(1, 1)), cache)
