"""Tensor and message encoding: exact round trips, bounded compression error, and refusals of bad input."""

import pytest
import torch

from jupyter_swarm.errors import ProtocolError, RemoteError
from jupyter_swarm.wire.messages import error_message, field, pack, unpack
from jupyter_swarm.wire.tensors import Compression, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_round_trip_is_exact(dtype):
    x = (torch.randn(2, 3, 5) * 10).to(dtype)
    y = decode_tensor(encode_tensor(x))
    assert y.dtype == dtype and torch.equal(x, y)


def test_empty_tensor_round_trips():
    assert decode_tensor(encode_tensor(torch.zeros(0, 4))).shape == (0, 4)


@pytest.mark.parametrize("compression,tolerance", [(Compression.FLOAT16, 1e-2), (Compression.BLOCKWISE_8BIT, 5e-2)])
def test_lossy_compression_keeps_dtype_and_bounded_error(compression, tolerance):
    x = torch.randn(3, 7, 100)
    y = decode_tensor(encode_tensor(x, compression))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (x - y).abs().max() <= tolerance * x.abs().max()
    assert len(encode_tensor(x, compression)["data"]) < len(encode_tensor(x)["data"])


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
