"""Tensor and message encoding: exact round trips, bounded compression error, and refusals of bad input."""

import pytest
import torch

import sys

from jupyter_swarm.errors import ConfigurationError, MissingDependencyError, ProtocolError, RemoteError
from jupyter_swarm.wire.messages import error_message, field, pack, unpack
from jupyter_swarm.wire.tensors import BLOCKWISE_BLOCK, Compression, decode_tensor, encode_tensor, parse_compression


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_round_trip_is_exact(dtype):
    x = (torch.randn(2, 3, 5) * 10).to(dtype)
    y = decode_tensor(encode_tensor(x))
    assert y.dtype == dtype and torch.equal(x, y)


def test_empty_tensor_round_trips():
    assert decode_tensor(encode_tensor(torch.zeros(0, 4))).shape == (0, 4)


@pytest.mark.parametrize("compression,tolerance,size", [(Compression.FLOAT16, 1e-3, 0.5), (Compression.BFLOAT16, 4e-3, 0.5),
                                                         (Compression.BLOCKWISE_8BIT, 2e-2, 0.26)])
def test_lossy_compression_keeps_dtype_and_bounded_error(compression, tolerance, size):
    x = torch.randn(3, 7, 100)
    encoded = encode_tensor(x, compression)
    y = decode_tensor(encoded)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert 0 < (x - y).abs().max() <= tolerance * x.abs().max()
    assert len(encoded["data"]) + len(encoded["scales"]) <= size * len(encode_tensor(x)["data"])
    half = x.to(torch.bfloat16)
    assert decode_tensor(encode_tensor(half, compression)).dtype == torch.bfloat16


def test_blockwise_8bit_keeps_outlier_features_and_small_values():
    """Hidden states of real LLMs have a few features hundreds of times larger than the rest (SmolLM2: 22,000 vs a
    typical 100); a linear 8-bit code scaled to them rounds the rest to zero, bitsandbytes' dynamic code does not."""
    x = torch.randn(4, 16, 576, generator=torch.Generator().manual_seed(0))
    x[..., 7] *= 1000.0
    encoded = encode_tensor(x, Compression.BLOCKWISE_8BIT)
    assert len(encoded["data"]) == x.numel() and len(encoded["scales"]) == 4 * x.numel() // BLOCKWISE_BLOCK
    y = decode_tensor(encoded)
    small = torch.ones(576, dtype=torch.bool)
    small[7] = False
    assert ((y - x)[..., small].norm() / x[..., small].norm()) < 0.05
    assert ((y - x).norm() / x.norm()) < 0.02


def test_bad_compressed_tensors_are_refused():
    good = encode_tensor(torch.randn(2, 300), Compression.BLOCKWISE_8BIT)
    with pytest.raises(ProtocolError, match="needs 600 data and 12 scale bytes"):
        decode_tensor({**good, "scales": good["scales"][:4]})
    with pytest.raises(ProtocolError, match="cannot travel compressed"):
        decode_tensor({**encode_tensor(torch.arange(4)), "comp": "float16"})
    with pytest.raises(ProtocolError, match="malformed tensor message"):
        decode_tensor({**good, "comp": "zip"})


def test_compression_names_are_checked_and_8bit_says_when_bitsandbytes_is_missing(monkeypatch):
    assert parse_compression("bfloat16") == Compression.BFLOAT16
    with pytest.raises(ConfigurationError, match="unknown compression 'zip'; choose one of none, float16, bfloat16, "
                                                 "blockwise8"):
        parse_compression("zip")
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match="8-bit blockwise compression needs bitsandbytes.*pip install"):
        parse_compression("blockwise8")
    assert parse_compression("float16") == Compression.FLOAT16


def test_bad_tensors_are_refused():
    with pytest.raises(ProtocolError, match="needs 24 bytes"):
        decode_tensor({"dtype": "float32", "shape": [2, 3], "data": b"x"})
    with pytest.raises(ProtocolError, match="unknown tensor dtype"):
        decode_tensor({"dtype": "complex1024", "shape": [1], "data": b""})
    with pytest.raises(ProtocolError, match="invalid tensor shape"):
        decode_tensor({"dtype": "float32", "shape": [-1], "data": b""})
    with pytest.raises(ProtocolError, match="expected a tensor"):
        decode_tensor([1, 2])


def test_messages_and_errors():
    assert unpack(pack({"type": "x", "n": 1}), "x") == {"type": "x", "n": 1}
    with pytest.raises(ProtocolError, match="expected a message of type y"):
        unpack(pack({"type": "x"}), "y")
    with pytest.raises(RemoteError, match="boom") as info:
        unpack(error_message("boom", invalid_request=True))
    assert info.value.invalid_request
    with pytest.raises(ProtocolError, match="field 'n' must be int"):
        field({"type": "x", "n": "1"}, "n", int)
    assert field({"type": "x"}, "n", int, 5) == 5
