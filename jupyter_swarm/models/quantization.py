"""Quantized blocks: each block's linear layers in 8 bits (LLM.int8()) or 4 bits (NF4, FP4), with bitsandbytes.

A server quantizes each block right after reading its weights, before it reads the next one, so it never holds
more than one block in float. Only the linear layers inside blocks are quantized; norms and biases keep the span's
dtype, and the client's embeddings and LM head are never quantized (as transformers does: it skips ``lm_head``).

The settings are those of Petals and QLoRA, and :func:`transformers_config` states them for transformers, so a
local model can be quantized exactly the same way (the tests and benchmarks compare against one):

* ``int8``: ``Linear8bitLt`` with frozen int8 weights and row scales, outlier threshold 6.0 (LLM.int8()'s mixed
  decomposition: input columns with a value above 6 are multiplied in float16).
* ``nf4`` / ``fp4``: ``Linear4bit``, one scale per 64 weights, the scales themselves quantized to 8 bits
  ("double quantization"), computing in the span's dtype.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import nn

from jupyter_swarm.bnb import import_bitsandbytes as _import_bitsandbytes
from jupyter_swarm.errors import ConfigurationError, UnsupportedQuantTypeError

INT8_THRESHOLD = 6.0
BLOCKSIZE_4BIT = 64
DOUBLE_QUANT = True


class QuantType(str, Enum):
    """How a server stores its blocks' linear weights."""

    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"
    FP4 = "fp4"


QUANT_TYPE_NAMES = tuple(q.value for q in QuantType)


def parse_quant_type(value: QuantType | str) -> QuantType:
    """The :class:`QuantType` named by ``value`` (case-insensitive).

    Raises:
        ConfigurationError: ``value`` names no quant type (the message lists the valid ones).
    """
    if isinstance(value, QuantType):
        return value
    try:
        return QuantType(str(value).strip().lower())
    except ValueError:
        raise ConfigurationError(
            f"unknown quant type {value!r}; choose one of {', '.join(QUANT_TYPE_NAMES)}") from None


def import_bitsandbytes(quant_type: QuantType | str) -> Any:
    """The ``bitsandbytes`` module, or :class:`MissingDependencyError` naming ``quant_type`` and how to install it."""
    return _import_bitsandbytes(f"quant type {QuantType(quant_type).value}")


def quantize_block(block: nn.Module, quant_type: QuantType, *, device: torch.device | str,
                   dtype: torch.dtype) -> nn.Module:
    """Replace every linear layer of ``block`` (float weights, on the CPU) by its quantized twin on ``device``.

    The block's other parameters move to ``device`` too; the float linear weights are dropped, so once the
    caller lets go of the state dict it read, only the quantized block stays in memory. Returns ``block``.
    """
    if quant_type == QuantType.NONE:
        return block.to(device)
    bnb = import_bitsandbytes(quant_type)
    for name, module in list(block.named_modules()):
        if type(module) is nn.Linear:
            block.set_submodule(name, _quantized_linear(bnb, module, quant_type, dtype))
    return block.to(device)  # bitsandbytes quantizes weights when they move to a device


def _quantized_linear(bnb: Any, linear: nn.Linear, quant_type: QuantType, dtype: torch.dtype) -> nn.Module:
    has_bias = linear.bias is not None
    with torch.device("meta"):  # no throw-away float weights: the real ones are set just below
        if quant_type == QuantType.INT8:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=INT8_THRESHOLD)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                      compress_statistics=DOUBLE_QUANT, quant_type=quant_type.value)
    weight = linear.weight.data.to("cpu", dtype)
    if quant_type == QuantType.INT8:
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE_4BIT,
                                         compress_statistics=DOUBLE_QUANT, quant_type=quant_type.value, module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to("cpu", dtype), requires_grad=False)
    keep_one_layout(layer)
    return layer


def keep_one_layout(layer: nn.Module) -> None:
    """Keep a 4-bit layer in the layout it was quantized to.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``'s weights the first time it runs without
    gradients, into a layout whose kernel computes in bfloat16 and has no backward: outputs then change, and
    gradients through the layer are silently wrong (measured: 5e-4 on outputs, 0.27 on input gradients of a tiny
    block). A server runs inference steps and backward requests on the same weights, so it must not repack.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def weight_bytes(block: nn.Module, quant_type: QuantType, dtype: torch.dtype) -> int:
    """Bytes the weights of ``block`` (a float block, possibly on the meta device) take once quantized.

    Int8: a byte per weight plus a float32 scale per output row. 4-bit: half a byte per weight plus, per 64
    weights, an 8-bit scale (and, per 256 scales, a float32 one), and small code books (counted per layer, though
    bitsandbytes may share them, so this is an upper bound). Parameters outside linear layers keep ``dtype``.
    """
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for module in block.modules():
        own = list(module.parameters(recurse=False))
        if quant_type != QuantType.NONE and type(module) is nn.Linear:
            numel = module.weight.numel()
            if quant_type == QuantType.INT8:
                total += numel + 4 * module.out_features
            else:
                blocks = -(-numel // BLOCKSIZE_4BIT)
                scales = blocks + 4 * -(-blocks // 256) + 4 + 4 * 256 if DOUBLE_QUANT else 4 * blocks
                total += -(-numel // 2) + scales + 4 * 16  # packed weights, scales, code books
            own = [] if module.bias is None else [module.bias]
        total += sum(p.numel() for p in own) * element
    return total


def measured_bytes(module: nn.Module) -> int:
    """Bytes of every tensor ``module`` holds: parameters, buffers and bitsandbytes' quantization states
    (scales, nested scales, code books), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    for layer in module.modules():
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            add(tensor)
            state = getattr(tensor, "quant_state", None)  # 4-bit: scales, code book, nested scales
            for part in (state, getattr(state, "state2", None)):
                for name in ("absmax", "code", "offset"):
                    add(getattr(part, name, None))
            add(getattr(tensor, "SCB", None))
        # Linear8bitLt moves its weight's row scales into its matmul state at the first forward
        matmul_state = getattr(layer, "state", None)
        add(getattr(matmul_state, "SCB", None))
        add(getattr(matmul_state, "CB", None))
    return total


def check_device_runs(quant_type: QuantType, device: torch.device | str, dtype: torch.dtype) -> None:
    """Check that ``device`` exists here and runs ``quant_type`` (one small quantized layer, forward and backward),
    so a server refuses before it joins the swarm rather than at its first request.

    Raises:
        ConfigurationError: ``device`` is not usable on this machine (no such GPU, or torch built without it).
        MissingDependencyError: bitsandbytes is not installed.
        UnsupportedQuantTypeError: bitsandbytes cannot run ``quant_type`` on ``device`` (the message names the
            quant types that do run there).
    """
    check_device(device)
    if quant_type == QuantType.NONE:
        return
    import_bitsandbytes(quant_type)
    failure = _probe(quant_type, torch.device(device), dtype)
    if failure is None:
        return
    works = [q.value for q in QuantType if q == QuantType.NONE or (q != quant_type and
                                                                   _probe(q, torch.device(device), dtype) is None)]
    raise UnsupportedQuantTypeError(
        f"{device} cannot run {quant_type.value} blocks in {str(dtype).removeprefix('torch.')} with bitsandbytes "
        f"{_version()} ({failure}); quant types that run here: {', '.join(works)} (--quant-type), or serve on "
        "another device (--device)")


def check_device(device: torch.device | str) -> None:
    """Raise :class:`ConfigurationError` unless ``device`` can hold a tensor on this machine."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # torch says "not compiled with CUDA", "invalid device"
        raise ConfigurationError(f"device {str(device)!r} is not usable on this machine ({e}); "
                                 "choose another with --device (e.g. cpu)") from None


def _probe(quant_type: QuantType, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if a 128 -> 64 layer of ``quant_type`` runs forward and backward on ``device``, else why not."""
    bnb = import_bitsandbytes(quant_type)
    if device.type not in getattr(bnb, "supported_torch_devices", {device.type}):
        return f"bitsandbytes has no kernels for {device.type} devices"
    try:
        generator = torch.Generator().manual_seed(0)
        linear = nn.Linear(128, 64, dtype=dtype)
        nn.init.normal_(linear.weight, generator=generator)
        layer = quantize_block(nn.Sequential(linear), quant_type, device=device, dtype=dtype)
        x = torch.randn(1, 2, 128, dtype=dtype, generator=generator).to(device).requires_grad_(True)
        out = layer(x)
        (grad,) = torch.autograd.grad(out.float().sum(), x)
        if not (torch.isfinite(out).all() and torch.isfinite(grad).all()):
            return "it computes non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run"; the message carries it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bitsandbytes")
    except Exception:  # noqa: BLE001
        return "(unknown version)"


def load_reference_model(model: str, quant_type: QuantType | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole model loaded by transformers itself on the CPU, its blocks quantized as servers quantize theirs:
    a local reference for what a swarm of such servers computes (tests and benchmarks compare against it)."""
    from transformers import AutoModelForCausalLM

    quant_type = parse_quant_type(quant_type)
    if quant_type != QuantType.NONE:
        import_bitsandbytes(quant_type)
    config = transformers_config(quant_type, dtype)
    extra = {} if config is None else {"quantization_config": config, "device_map": "cpu"}
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **extra)
    for layer in reference.modules():
        keep_one_layout(layer)
    return reference.eval()


def transformers_config(quant_type: QuantType, dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` that quantizes a whole model as servers quantize their blocks
    (None for ``none``): ``from_pretrained(..., quantization_config=...)``."""
    if quant_type == QuantType.NONE:
        return None
    from transformers import BitsAndBytesConfig

    if quant_type == QuantType.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD,
                                  llm_int8_has_fp16_weight=False)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type.value,
                              bnb_4bit_use_double_quant=DOUBLE_QUANT, bnb_4bit_compute_dtype=dtype)


def perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of each next token of ``input_ids`` ``[batch, n]`` under ``logits``
    ``[batch, n, vocab]``: how much a quantized model's predictions lost against a float one's on the same text."""
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    return float(torch.exp(loss))
