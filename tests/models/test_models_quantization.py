"""Quantized spans (bitsandbytes int8, nf4, fp4): loading block by block, memory, views, and clear errors."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch
from torch import nn

from jupyter_swarm.errors import ConfigurationError, MissingDependencyError, UnsupportedQuantTypeError
from jupyter_swarm.models import BlockSpan, make_tiny_model
from jupyter_swarm.models import span as span_module
from jupyter_swarm.models.quantization import (QuantType, check_device_runs, measured_bytes, parse_quant_type,
                                               weight_bytes)

QUANTIZED = [QuantType.INT8, QuantType.NF4, QuantType.FP4]
#: relative error of a quantized span's output against the float span's, on a model with realistic weight scales
#: (measured: int8 0.005, nf4 0.06, fp4 0.08)
MAX_RELATIVE_ERROR = {QuantType.INT8: 0.02, QuantType.NF4: 0.15, QuantType.FP4: 0.2}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama with transformers' usual weight scale (0.02), so quantization errors look like real ones."""
    return make_tiny_model(str(tmp_path_factory.mktemp("quant") / "llama"), hidden_size=128, num_layers=4,
                           num_heads=4, num_kv_heads=2, seed=5, config_overrides={"initializer_range": 0.02})


def linear_types(span: BlockSpan) -> set[str]:
    return {type(m).__name__ for m in span.modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("quant_type", QUANTIZED)
def test_quantized_span_runs_close_to_float_in_less_memory(model, quant_type):
    float_span = BlockSpan.load(model, 0, 4)
    span = BlockSpan.load(model, 0, 4, quant_type=quant_type.value)
    assert span.quant_type == quant_type and quant_type.value in repr(span)
    assert linear_types(span) == {"Linear8bitLt" if quant_type == QuantType.INT8 else "Linear4bit"}
    hidden = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(0))
    expected, out = float_span(hidden), span(hidden)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    error = (out - expected).norm() / (expected - hidden).norm()  # relative to what the blocks add
    assert 0 < error < MAX_RELATIVE_ERROR[quant_type]
    # memory: what the server's sizing predicts (an upper bound, within 1%), and much less than float32
    predicted = 4 * weight_bytes(float_span.blocks[0], quant_type, torch.float32)
    assert 0.99 * predicted <= measured_bytes(span.blocks) <= predicted
    assert measured_bytes(span.blocks) < (0.3 if quant_type == QuantType.INT8 else 0.18) * measured_bytes(float_span.blocks)
    assert measured_bytes(float_span.blocks) == 4 * weight_bytes(float_span.blocks[0], QuantType.NONE, torch.float32)


@pytest.mark.parametrize("quant_type", QUANTIZED)
def test_gradients_stay_right_after_inference_steps(model, quant_type):
    """bitsandbytes may switch a 4-bit layer to an inference-only layout at its first forward without gradients
    (on CPUs with AVX512-BF16); a server's backward requests come after inference steps, so that must not happen."""
    hidden = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(2))

    def input_grad(span: BlockSpan) -> torch.Tensor:
        leaf = hidden.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((span(leaf) ** 2).sum(), leaf)
        return grad

    fresh = input_grad(BlockSpan.load(model, 0, 4, quant_type=quant_type))
    span = BlockSpan.load(model, 0, 4, quant_type=quant_type)
    with torch.inference_mode():
        before = span(hidden)
        span(hidden[:, :1], cache=span.new_cache(1, 4))
    torch.testing.assert_close(input_grad(span), fresh, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(span(hidden), before, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", QUANTIZED)
def test_quantized_views_share_layers_and_caches_give_the_same_outputs(model, quant_type):
    span = BlockSpan.load(model, 0, 4, quant_type=quant_type)
    hidden = torch.randn(1, 6, 128, generator=torch.Generator().manual_seed(1))
    whole = span(hidden)
    views = [span.narrow(0, 1), span.narrow(1, 3), span.narrow(3, 4)]
    assert views[1].blocks[0].self_attn.q_proj is span.blocks[1].self_attn.q_proj  # shared, not copied
    assert views[1].quant_type == quant_type
    chained = hidden
    for view in views:
        chained = view(chained)
    torch.testing.assert_close(chained, whole, rtol=0, atol=1e-5)
    cache = span.new_cache(1, 8)
    steps = torch.cat([span(hidden[:, :4], cache=cache), span(hidden[:, 4:5], cache=cache),
                       span(hidden[:, 5:], cache=cache)], dim=1)
    torch.testing.assert_close(steps, whole, rtol=1e-4, atol=1e-4)


def test_each_block_is_quantized_before_the_next_is_read(model, monkeypatch):
    """The float weights of a block are gone before the next block's are read, so a span is never held in float."""
    read = span_module.Checkpoint.read
    float_weights: list[weakref.ref] = []
    alive_at_each_read: list[int] = []

    def spy(self, names, device="cpu"):
        alive_at_each_read.append(sum(ref() is not None for ref in float_weights))
        tensors = read(self, names, device)
        # a storage's Python object lives exactly as long as the memory (torch keeps one per storage)
        float_weights.extend(weakref.ref(t.untyped_storage()) for t in tensors.values() if t.ndim == 2)
        return tensors

    monkeypatch.setattr(span_module.Checkpoint, "read", spy)
    span = BlockSpan.load(model, 0, 4, quant_type="nf4")
    assert len(alive_at_each_read) == 4 and alive_at_each_read == [0, 0, 0, 0]
    assert all(ref() is None for ref in float_weights)
    del span
    float_weights.clear()
    alive_at_each_read.clear()
    kept = BlockSpan.load(model, 0, 4, quant_type="none")  # the spy does see float weights that stay
    assert alive_at_each_read == [0, 7, 14, 21] and kept is not None


def test_weight_bytes_counts_bloom_biases_in_the_dtype(tmp_path):
    path = make_tiny_model(str(tmp_path / "bloom"), family="bloom", hidden_size=128, num_layers=2, num_heads=4)
    for quant_type in QuantType:
        span = BlockSpan.load(path, 0, 1, quant_type=quant_type)
        predicted = weight_bytes(BlockSpan.load(path, 0, 1).blocks[0], quant_type, torch.float32)
        assert 0.99 * predicted <= measured_bytes(span.blocks) <= predicted


def test_unknown_quant_type_is_refused_with_the_choices(model):
    assert parse_quant_type(" NF4 ") == QuantType.NF4
    with pytest.raises(ConfigurationError, match="unknown quant type 'int4'; choose one of none, int8, nf4, fp4"):
        BlockSpan.load(model, 0, 1, quant_type="int4")


def test_missing_bitsandbytes_says_how_to_install_it(model, monkeypatch):
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it looks like to import
    with pytest.raises(MissingDependencyError, match=r"quant type nf4 needs bitsandbytes.*pip install"):
        BlockSpan.load(model, 0, 1, quant_type="nf4")
    with pytest.raises(MissingDependencyError, match="quant type int8 needs bitsandbytes"):
        check_device_runs(QuantType.INT8, "cpu", torch.float32)
    assert BlockSpan.load(model, 0, 1).quant_type == QuantType.NONE  # float blocks do not need it


def test_a_quant_type_the_device_cannot_run_is_refused_naming_what_runs(monkeypatch):
    import bitsandbytes

    for quant_type in QuantType:
        check_device_runs(quant_type, "cpu", torch.float32)  # this CPU runs them all

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_kernel)  # as on a device bitsandbytes has no kernel for
    with pytest.raises(UnsupportedQuantTypeError, match=r"cpu cannot run nf4 blocks in float32 .*"
                                                        r"no 4-bit kernel.*quant types that run here: none, int8"):
        check_device_runs(QuantType.NF4, "cpu", torch.float32)
    with pytest.raises(ConfigurationError, match="device 'cuda:99' is not usable on this machine"):
        check_device_runs(QuantType.NONE, "cuda:99", torch.float32)  # no machine has a hundredth GPU
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(UnsupportedQuantTypeError, match="no kernels for cpu devices.*quant types that run here: none"):
        check_device_runs(QuantType.INT8, "cpu", torch.float32)
