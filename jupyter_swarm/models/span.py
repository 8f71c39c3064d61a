"""A span of blocks: the part of a model one server holds and runs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models.cache import SpanCache
from jupyter_swarm.models.checkpoint import Checkpoint, cast_floating, check_materialised
from jupyter_swarm.models.config import config_dtype, load_model_config
from jupyter_swarm.models.family import ModelFamily, get_family
from jupyter_swarm.models.quantization import QuantType, parse_quant_type, quantize_block


class BlockSpan(nn.Module):
    """Blocks ``[start, end)`` of a model, built from transformers' own decoder layers.

    Make one with :meth:`load`. Its weights are frozen (``requires_grad=False``); gradients flow to the hidden
    states and prompts given to :meth:`forward`.

    Attributes:
        config: the whole model's config.
        start, end, num_blocks: the span (``num_blocks = end - start``).
        hidden_size: width of the hidden states it takes and returns.
        dtype, device: of its weights (those outside quantized layers) and cache; the dtype blocks compute in.
        quant_type: how its linear layers are stored (:mod:`jupyter_swarm.models.quantization`).
        blocks: the decoder layers (``blocks[i]`` is block ``start + i`` of the model).
        checkpoint_names: the checkpoint tensors that were read to build it.
    """

    def __init__(self, config: PreTrainedConfig, family: ModelFamily, start: int, end: int, blocks: nn.ModuleList,
                 position_module: nn.Module | None, *, dtype: torch.dtype, device: torch.device,
                 quant_type: QuantType = QuantType.NONE, checkpoint_names: tuple[str, ...] = ()):
        super().__init__()
        self.config = config
        self.family = family
        self.span_config = family.span_config(config, start, end)
        self.start, self.end, self.num_blocks = start, end, end - start
        self.hidden_size = int(config.hidden_size)
        self.dtype, self.device = dtype, device
        self.quant_type = quant_type
        self.blocks = blocks
        self.position_module = position_module
        self.checkpoint_names = checkpoint_names

    @classmethod
    def load(cls, model: str, start: int, end: int, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", quant_type: QuantType | str = QuantType.NONE,
             progress: bool = False) -> BlockSpan:
        """Load blocks ``[start, end)`` of ``model`` (a local directory or hub id), reading only their weights.

        ``progress``: show a tqdm bar, one step per block (a widget in notebooks).

        Args:
            dtype: of the weights and cache; None means the checkpoint's own dtype (float32 if it does not say).
            device: where the weights and cache live.
            quant_type: "none", "int8", "nf4" or "fp4". Each block is quantized as soon as it is read, before the
                next one is, so the span is never held in float.

        Raises:
            ConfigurationError: the span is empty or outside ``[0, number of blocks]``, or the checkpoint lacks
                some of the span's weights.
            UnsupportedModelError: ``model`` is not a supported causal LM.
            MissingDependencyError: a quant type needs bitsandbytes, which is not installed.
        """
        quant_type = parse_quant_type(quant_type)
        config = load_model_config(model)
        family = get_family(config)
        check_span(start, end, family.num_blocks(config), repr(model))
        dtype = dtype or config_dtype(config)
        device = torch.device(device)
        span_config = family.span_config(config, start, end)
        with torch.device("meta"):
            blocks = nn.ModuleList(family.make_block(span_config, i) for i in range(end - start))
        checkpoint = Checkpoint.open(model)
        names_read: list[str] = []
        from tqdm.auto import tqdm

        for i, block in enumerate(tqdm(blocks, desc=f"loading blocks {start}:{end}", unit="block",
                                       disable=not progress)):
            names = checkpoint.resolve(family.block_prefixes(start + i), block.state_dict().keys(),
                                       what=f"block {start + i}")
            # a quantized block is read to the CPU: bitsandbytes quantizes weights as they move from there
            tensors = checkpoint.read(names.values(), device if quant_type == QuantType.NONE else "cpu")
            state = {local: cast_floating(tensors[name], dtype) for local, name in names.items()}
            del tensors
            block.load_state_dict(state, strict=True, assign=True)
            del state
            if quant_type != QuantType.NONE:
                blocks[i] = quantize_block(block, quant_type, device=device, dtype=dtype)
            del block
            names_read.extend(names.values())
        with torch.device(device):
            position_module = family.make_position_module(span_config)
        span = cls(config, family, start, end, blocks, position_module, dtype=dtype, device=device,
                   quant_type=quant_type, checkpoint_names=tuple(names_read))
        check_materialised(span, f"blocks {start}:{end} of {model!r}")
        return span.requires_grad_(False).eval()

    def narrow(self, start: int, end: int) -> BlockSpan:
        """Blocks ``[start, end)`` of this span as a span of their own, sharing this span's weights (no copy).

        A server uses it when a client's route needs only part of the server's span. The view's blocks are built
        anew (their layer indices count from the view's start, as its cache does) around the span's own layers,
        so quantized layers and the adapters hooked on them are shared as they are.
        """
        if (start, end) == (self.start, self.end):
            return self
        if not self.start <= start < end <= self.end:
            raise ConfigurationError(
                f"blocks {start}:{end} are not inside this server's span {self.start}:{self.end}")
        span_config = self.family.span_config(self.config, start, end)
        with torch.device("meta"):
            blocks = nn.ModuleList(self.family.make_block(span_config, i) for i in range(end - start))
        for i, block in enumerate(blocks):
            _share_layers(block, self.blocks[start - self.start + i])
        with torch.device(self.device):
            position_module = self.family.make_position_module(span_config)
        view = BlockSpan(self.config, self.family, start, end, blocks, position_module, dtype=self.dtype,
                         device=self.device, quant_type=self.quant_type)
        check_materialised(view, f"blocks {start}:{end} (a view of {self.start}:{self.end})")
        return view.requires_grad_(False).eval()

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        """An empty cache for a session of ``batch_size`` rows and at most ``max_length`` tokens."""
        return SpanCache(self.span_config, start=self.start, end=self.end, batch_size=batch_size,
                         max_length=max_length)

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """Memory that keys and values of a full cache of this size take over the span's blocks, in bytes."""
        return self.family.cache_bytes(self.span_config, batch_size, max_length, self.dtype)

    def forward(self, hidden_states: torch.Tensor, cache: SpanCache | None = None,
                prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the span's blocks over ``hidden_states`` ``[batch, seq, hidden]``.

        Without a cache, this is a plain causal forward over positions ``0..seq-1``. With a cache, the hidden
        states are the new tokens at positions ``cache.length...``, and the cache is extended in place.
        ``prompts`` ``[num_blocks, batch or 1, pre_seq_len, hidden]`` are added to the first ``pre_seq_len``
        tokens before each block, only when this call starts at position 0 (no cache, or an empty one).
        The result has the dtype of ``hidden_states``.

        Raises:
            SessionLengthError: the cache would hold more than its ``max_length`` tokens.
            ConfigurationError: shapes do not match the span or the cache.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ConfigurationError(
                f"hidden states must have shape [batch, seq, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        batch_size, seq_length, _ = hidden_states.shape
        past_length = 0
        if cache is not None:
            if (cache.start, cache.end) != (self.start, self.end):
                raise ConfigurationError(
                    f"this cache belongs to blocks {cache.start}:{cache.end}, not {self.start}:{self.end}")
            cache.check_extend(batch_size, seq_length)
            past_length = cache.length
        if prompts is not None:
            if past_length > 0:
                prompts = None  # the prompt positions are already in the cache
            else:
                self._check_prompts(prompts, batch_size)
        input_dtype = hidden_states.dtype
        try:
            output = self.family.run_blocks(
                self.blocks, hidden_states.to(device=self.device, dtype=self.dtype), span_config=self.span_config,
                cache=cache.hf_cache if cache is not None else None, past_length=past_length,
                position_module=self.position_module, prompts=prompts)
        except BaseException:
            if cache is not None:
                cache.mark_broken()
            raise
        if cache is not None:
            cache.advance(seq_length)
        return output.to(input_dtype)

    def _check_prompts(self, prompts: torch.Tensor, batch_size: int) -> None:
        if (prompts.dim() != 4 or prompts.shape[0] != self.num_blocks or prompts.shape[1] not in (1, batch_size)
                or prompts.shape[3] != self.hidden_size):
            raise ConfigurationError(
                f"prompts must have shape [{self.num_blocks}, {batch_size} or 1, pre_seq_len, {self.hidden_size}], "
                f"got {tuple(prompts.shape)}")

    def extra_repr(self) -> str:
        return (f"blocks {self.start}:{self.end} of {self.config.model_type}, dtype={self.dtype}, "
                f"quant_type={self.quant_type.value}, device={self.device}")


def _share_layers(target: nn.Module, source: nn.Module) -> None:
    """Put ``source``'s leaf modules (the layers holding weights) into ``target``, a block of the same shape built
    on the meta device; a weight held by a module with children is shared tensor by tensor."""
    for name, module in source.named_modules():
        if name and not any(True for _ in module.children()):
            target.set_submodule(name, module)
    left = {name for name, t in [*target.named_parameters(), *target.named_buffers()] if t.is_meta}
    if left:
        state = source.state_dict(keep_vars=True)
        target.load_state_dict({name: state[name] for name in left if name in state}, strict=False, assign=True)


def check_span(start: int, end: int, num_blocks: int, model: str = "the model") -> None:
    """Raise :class:`ConfigurationError` unless ``0 <= start < end <= num_blocks``."""
    if not (0 <= start < end <= num_blocks):
        raise ConfigurationError(
            f"blocks {start}:{end} are not a span of {model}, which has {num_blocks} blocks; "
            f"use START:END with 0 <= START < END <= {num_blocks}")

