"""Tensors as bytes: dtype, shape and raw little-endian data, with optional lossy compression.

Compression applies to floating tensors on the wire only (hidden states, prompts, gradients); the receiver always
gets back the dtype the sender started from, so code on both ends is unaware of it. A client chooses it per model
or per inference session; servers answer in the compression of the request.

8-bit blockwise is bitsandbytes' dynamic quantizer: each block of 256 values is scaled by its absolute maximum and
mapped to one of 256 levels spaced for heavy-tailed data. On SmolLM2's hidden states, whose few huge outlier
features ruin a linear 8-bit code, it has 3-15x less error than linear int8 blocks of the same size
(``bench/bench_compression.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from jupyter_swarm.bnb import import_bitsandbytes
from jupyter_swarm.errors import ConfigurationError, ProtocolError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_TENSOR_ELEMENTS = 1 << 31


class Compression(str, Enum):
    """How a floating tensor travels: as is, as float16 or bfloat16 (half the bytes of float32), or blockwise 8-bit
    (a quarter, plus a float32 scale per 256 values)."""

    NONE = "none"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    BLOCKWISE_8BIT = "blockwise8"


BLOCKWISE_BLOCK = 256  # values per scale of 8-bit blockwise: 1.6% more bytes than 4096, 1.3-1.5x less error


def parse_compression(value: Compression | str) -> Compression:
    """The :class:`Compression` named ``value``; for 8-bit blockwise, checks that bitsandbytes can be imported.

    Raises:
        ConfigurationError: ``value`` names no compression (the message lists them).
        MissingDependencyError: 8-bit blockwise without bitsandbytes installed.
    """
    try:
        compression = Compression(value)
    except ValueError:
        raise ConfigurationError(f"unknown compression {value!r}; choose one of "
                                 f"{', '.join(c.value for c in Compression)}") from None
    if compression == Compression.BLOCKWISE_8BIT:
        import_bitsandbytes("8-bit blockwise compression")
    return compression


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
    if compression in (Compression.FLOAT16, Compression.BFLOAT16):
        data, scales = _raw_bytes(cpu.to(_HALF[compression])), b""
    elif compression == Compression.BLOCKWISE_8BIT:
        data, scales = _blockwise_quantize(cpu)
    else:
        data, scales = _raw_bytes(cpu), b""
    return EncodedTensor(name, tuple(cpu.shape), Compression(compression).value, data, scales).to_wire()


@dataclass(frozen=True)
class TensorHeader:
    """What an encoded tensor claims to be, checked against its byte counts, before anything is allocated."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    compression: Compression

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


MAX_TENSOR_DIMS = 8
_COMPRESSIONS = {c.value: c for c in Compression}


def read_header(obj: object) -> TensorHeader:
    """Validate an encoded tensor's fields and byte counts without decoding it (nothing is allocated)."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a tensor, got {type(obj).__name__}")
    try:
        dtype = dtype_from_name(obj["dtype"])
        shape = obj["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(type(s) is int for s in shape):
            raise TypeError(f"shape must be a list of at most {MAX_TENSOR_DIMS} integers, got {shape!r}")
        shape = tuple(shape)
        comp = _COMPRESSIONS[obj.get("comp", "none")]
        data = obj["data"]
        scales = obj.get("scales", b"")
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed tensor message: {e!r}") from e
    numel = math.prod(shape)
    if (shape and min(shape) < 0) or numel > MAX_TENSOR_ELEMENTS:
        raise ProtocolError(f"invalid tensor shape {shape}")
    if not isinstance(data, (bytes, bytearray)) or not isinstance(scales, (bytes, bytearray)):
        raise ProtocolError("tensor data must be bytes")
    if comp != Compression.NONE and not dtype.is_floating_point:
        raise ProtocolError(f"a {dtype} tensor cannot travel compressed ({comp.value})")
    if comp == Compression.BLOCKWISE_8BIT:
        num_blocks = (numel + BLOCKWISE_BLOCK - 1) // BLOCKWISE_BLOCK
        if len(data) != numel or len(scales) != 4 * num_blocks:
            raise ProtocolError(f"an 8-bit tensor of {numel} values needs {numel} data and {4 * num_blocks} scale "
                                f"bytes (blocks of {BLOCKWISE_BLOCK}), got {len(data)} and {len(scales)}")
    else:
        wire_dtype = _HALF.get(comp, dtype)
        if len(data) != numel * wire_dtype.itemsize:
            raise ProtocolError(f"tensor of shape {shape} and dtype {wire_dtype} needs {numel * wire_dtype.itemsize} "
                                f"bytes, got {len(data)}")
    return TensorHeader(dtype, shape, comp)


def decode_tensor(obj: object, header: TensorHeader | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; validates everything a peer could get wrong (:func:`read_header`) first,
    unless ``header`` is what read_header already returned for ``obj``."""
    header = read_header(obj) if header is None else header
    assert isinstance(obj, dict)
    data, shape, dtype, numel = obj["data"], header.shape, header.dtype, header.numel
    if header.compression == Compression.BLOCKWISE_8BIT:
        return _blockwise_dequantize(data, obj.get("scales", b""), numel, shape).to(dtype)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=_HALF.get(header.compression, dtype))
    return flat.reshape(shape).to(dtype)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.numel() == 0:
        return b""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().tobytes()
    return tensor.numpy().tobytes()


_HALF = {Compression.FLOAT16: torch.float16, Compression.BFLOAT16: torch.bfloat16}


def _blockwise_quantize(tensor: torch.Tensor) -> tuple[bytes, bytes]:
    functional = import_bitsandbytes("8-bit blockwise compression").functional
    codes, state = functional.quantize_blockwise(tensor.float().flatten(), blocksize=BLOCKWISE_BLOCK)
    return codes.numpy().tobytes(), state.absmax.float().numpy().tobytes()


def _blockwise_dequantize(data: bytes, scales: bytes, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    num_blocks = (numel + BLOCKWISE_BLOCK - 1) // BLOCKWISE_BLOCK
    if len(data) != numel or len(scales) != 4 * num_blocks:
        raise ProtocolError(f"an 8-bit tensor of {numel} values needs {numel} data and {4 * num_blocks} scale bytes "
                            f"(blocks of {BLOCKWISE_BLOCK}), got {len(data)} and {len(scales)}")
    if numel == 0:
        return torch.empty(shape)
    functional = import_bitsandbytes("8-bit blockwise compression").functional
    codes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    absmax = torch.frombuffer(bytearray(scales), dtype=torch.float32)
    state = functional.QuantState(absmax=absmax, code=_dynamic_code(functional), blocksize=BLOCKWISE_BLOCK,
                                  dtype=torch.float32)
    return functional.dequantize_blockwise(codes, state).reshape(shape)


_CODE: list[torch.Tensor] = []


def _dynamic_code(functional: object) -> torch.Tensor:
    """bitsandbytes' signed dynamic code book (the one ``quantize_blockwise`` uses by default), made once."""
    if not _CODE:
        _CODE.append(functional.create_dynamic_map(signed=True))  # type: ignore[attr-defined]
    return _CODE[0]
