"""What differs between model families, and the registry that picks the family of a config.

A family adapts transformers' own decoder layers to jupyter-swarm: how to build block ``i`` of a span, where its
weights live in a checkpoint, which parts the client holds, and how a list of blocks runs over hidden states with
a cache. Adding a family is one short module that subclasses :class:`ModelFamily` and calls
:func:`register_family`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Cache, PreTrainedConfig

from jupyter_swarm.errors import ConfigurationError, UnsupportedModelError

_REGISTRY: dict[str, ModelFamily] = {}


class ModelFamily(ABC):
    """How one family of decoder-only causal LMs is split into client parts and blocks.

    Terms: a *block* is one decoder layer; a *span* is blocks ``[start, end)``. Inside a span, blocks are built
    with a *span config* (a copy of the model config cut down to the span's layers), so that block ``start + i``
    is layer ``i`` of the span and of the span's cache.
    """

    #: short family name, e.g. "llama"
    name: ClassVar[str]
    #: config.model_type values this family serves
    model_types: ClassVar[tuple[str, ...]]
    #: attention implementation the blocks run with ("sdpa" or "eager")
    attn_implementation: ClassVar[str] = "sdpa"
    #: checkpoint name prefixes of each client part, tried in order (with and without the base-model prefix);
    #: keys: "embeddings", "embeddings_norm" (optional), "norm", "lm_head"
    client_prefixes: ClassVar[dict[str, tuple[str, ...]]]

    # ----- shapes -------------------------------------------------------------------------------------------
    def num_blocks(self, config: PreTrainedConfig) -> int:
        """Number of blocks (decoder layers) in the whole model."""
        return int(config.num_hidden_layers)

    @abstractmethod
    def kv_shape(self, config: PreTrainedConfig) -> tuple[int, int]:
        """``(num_key_value_heads, head_dim)`` of one block's attention cache."""

    def layer_windows(self, span_config: PreTrainedConfig) -> list[int | None]:
        """Per span layer: its sliding attention window in tokens, or None for full attention."""
        return [None] * span_config.num_hidden_layers

    # ----- blocks -------------------------------------------------------------------------------------------
    @abstractmethod
    def block_prefixes(self, index: int) -> tuple[str, ...]:
        """Checkpoint name prefixes of block ``index`` (of the whole model), tried in order."""

    @abstractmethod
    def make_block(self, span_config: PreTrainedConfig, local_index: int) -> nn.Module:
        """Build layer ``local_index`` of the span (called on the meta device; weights are loaded afterwards)."""

    def span_config(self, config: PreTrainedConfig, start: int, end: int) -> PreTrainedConfig:
        """A copy of ``config`` describing only blocks ``[start, end)``, with this family's attention kernel."""
        span_config = copy.deepcopy(config)
        span_config.num_hidden_layers = end - start
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            span_config.layer_types = list(layer_types[start:end])
        span_config._attn_implementation = self.attn_implementation
        return span_config

    def make_position_module(self, span_config: PreTrainedConfig) -> nn.Module | None:
        """A module computing position encodings for the span (e.g. rotary embeddings), or None."""
        return None

    @abstractmethod
    def prepare(self, span_config: PreTrainedConfig, hidden_states: torch.Tensor, cache: Cache | None,
                past_length: int, position_module: nn.Module | None) -> dict[str, Any]:
        """Per-forward inputs shared by all blocks: masks, positions, rotary or ALiBi terms."""

    @abstractmethod
    def run_block(self, block: nn.Module, hidden_states: torch.Tensor, context: dict[str, Any],
                  cache: Cache | None, local_index: int) -> torch.Tensor:
        """Run one block; ``context`` is what :meth:`prepare` returned."""

    def run_blocks(self, blocks: Sequence[nn.Module], hidden_states: torch.Tensor, *, span_config: PreTrainedConfig,
                   cache: Cache | None, past_length: int, position_module: nn.Module | None = None,
                   prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``blocks`` in order over ``hidden_states`` (the new tokens, at positions ``past_length...``).

        ``prompts`` (deep prompt tuning), if given, has shape ``[len(blocks), batch or 1, pre_seq_len, hidden]``;
        ``prompts[i]`` is added to the first ``pre_seq_len`` tokens before block ``i``.
        """
        context = self.prepare(span_config, hidden_states, cache, past_length, position_module)
        for i, block in enumerate(blocks):
            if prompts is not None:
                hidden_states = _add_prompt(hidden_states, prompts[i])
            hidden_states = self.run_block(block, hidden_states, context, cache, i)
        return hidden_states

    # ----- client parts -------------------------------------------------------------------------------------
    @abstractmethod
    def make_client_modules(self, config: PreTrainedConfig) -> dict[str, nn.Module]:
        """Build the client parts (keys as in :attr:`client_prefixes`) on the current (meta) device."""

    def cache_bytes(self, span_config: PreTrainedConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """Bytes of keys and values for ``batch_size`` rows of ``max_length`` tokens over the span's layers."""
        kv_heads, head_dim = self.kv_shape(span_config)
        element = torch.empty((), dtype=dtype).element_size()
        total = 0
        for window in self.layer_windows(span_config):
            tokens = max_length if window is None else min(max_length, window)
            total += 2 * batch_size * kv_heads * head_dim * tokens * element
        return total


def _add_prompt(hidden_states: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    length = min(prompt.shape[1], hidden_states.shape[1])
    if length == 0:
        return hidden_states
    head = hidden_states[:, :length] + prompt[:, :length].to(hidden_states.dtype)
    return torch.cat([head, hidden_states[:, length:]], dim=1)


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` serve its ``model_types``; returns it, so a module can write ``X = register_family(...)``."""
    for model_type in family.model_types:
        if model_type in _REGISTRY and type(_REGISTRY[model_type]) is not type(family):
            raise ConfigurationError(
                f"model_type {model_type!r} is already served by family {_REGISTRY[model_type].name!r}")
        _REGISTRY[model_type] = family
    return family


def supported_model_types() -> list[str]:
    """All config.model_type values some registered family serves, sorted."""
    return sorted(_REGISTRY)


def get_family(config: PreTrainedConfig) -> ModelFamily:
    """The family serving ``config``.

    Raises:
        UnsupportedModelError: no registered family serves ``config.model_type``.
    """
    model_type = getattr(config, "model_type", None)
    family = _REGISTRY.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported causal LM family; "
            f"supported model types: {', '.join(supported_model_types())}")
    return family
