"""Tensors as bytes: dtype, shape and raw little-endian data, with optional lossy compression.

Compression applies to hidden states on the wire only; the receiver always gets back the dtype the
sender started from, so code on both ends is unaware of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from jupyter_swarm.errors import ProtocolError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_TENSOR_ELEMENTS = 1 << 31


class Compression(str, Enum):
    """How a floating tensor travels: as is, as float16, or blockwise 8-bit."""

    NONE = "none"
    FLOAT16 = "float16"
    BLOCKWISE_8BIT = "blockwise8"


_BLOCK = 4096


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor ready for msgpack: everything is a plain type."""

    dtype: str
    shape: tuple[int, ...]
    compression: str
    data: bytes
    scales: bytes = b""

    def to_wire(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "comp": self.compression, "data": self.data,
                "scales": self.scales}


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of a wire name such as 'float32'."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ProtocolError(f"unknown tensor dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"tensors of dtype {dtype} cannot be sent; use one of {sorted(_DTYPES)}") from None


def encode_tensor(tensor: torch.Tensor, compression: Compression = Compression.NONE) -> dict:
    """Serialise a tensor (any device) to a msgpack-ready dict."""
    tensor = tensor.detach()
    name = dtype_name(tensor.dtype)
    if compression != Compression.NONE and not tensor.is_floating_point():
        compression = Compression.NONE
    cpu = tensor.to("cpu").contiguous()
    if compression == Compression.FLOAT16:
        data, scales = _raw_bytes(cpu.to(torch.float16)), b""
    elif compression == Compression.BLOCKWISE_8BIT:
        data, scales = _blockwise_quantize(cpu)
    else:
        data, scales = _raw_bytes(cpu), b""
    return EncodedTensor(name, tuple(cpu.shape), Compression(compression).value, data, scales).to_wire()


def decode_tensor(obj: object) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; validates everything a peer could get wrong."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a tensor, got {type(obj).__name__}")
    try:
        dtype = dtype_from_name(obj["dtype"])
        shape = tuple(int(s) for s in obj["shape"])
        comp = Compression(obj.get("comp", "none"))
        data = obj["data"]
        scales = obj.get("scales", b"")
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed tensor message: {e!r}") from e
    if any(s < 0 for s in shape) or math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise ProtocolError(f"invalid tensor shape {shape}")
    if not isinstance(data, (bytes, bytearray)) or not isinstance(scales, (bytes, bytearray)):
        raise ProtocolError("tensor data must be bytes")
    numel = math.prod(shape)
    if comp == Compression.BLOCKWISE_8BIT:
        return _blockwise_dequantize(data, scales, numel, shape).to(dtype)
    wire_dtype = torch.float16 if comp == Compression.FLOAT16 else dtype
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    if len(data) != numel * itemsize:
        raise ProtocolError(f"tensor of shape {shape} and dtype {wire_dtype} needs {numel * itemsize} bytes, "
                            f"got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=wire_dtype)
    return flat.reshape(shape).to(dtype)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.numel() == 0:
        return b""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().tobytes()
    return tensor.numpy().tobytes()


def _blockwise_quantize(tensor: torch.Tensor) -> tuple[bytes, bytes]:
    flat = tensor.float().flatten()
    pad = (-flat.numel()) % _BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, _BLOCK)
    scales = blocks.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(blocks / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.flatten()[: flat.numel()].numpy().tobytes(), scales.numpy().tobytes()


def _blockwise_dequantize(data: bytes, scales: bytes, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    num_blocks = (numel + _BLOCK - 1) // _BLOCK
    if len(data) != numel or len(scales) != 4 * num_blocks:
        raise ProtocolError(f"8-bit tensor of {numel} elements has {len(data)} data / {len(scales)} scale bytes")
    if numel == 0:
        return torch.empty(shape)
    q = torch.frombuffer(bytearray(data), dtype=torch.int8).float()
    s = torch.frombuffer(bytearray(scales), dtype=torch.float32)
    q = torch.nn.functional.pad(q, (0, num_blocks * _BLOCK - numel)).view(num_blocks, _BLOCK) * s[:, None]
    return q.flatten()[:numel].reshape(shape)
