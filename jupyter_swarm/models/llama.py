"""Llama-shaped families: Llama, Mistral and Qwen2 (RMSNorm, rotary positions, grouped-query attention).

The blocks are transformers' own decoder layers; positions enter as rotary ``position_embeddings`` computed once
per forward by the model type's own rotary module, and each layer gets the causal (or sliding-window) mask built
by transformers' masking helpers for its layer type.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Cache, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from jupyter_swarm.models.family import ModelFamily, register_family

SLIDING = "sliding_attention"
FULL = "full_attention"


class LlamaFamily(ModelFamily):
    """Llama-shaped decoder-only models saved from ``*ForCausalLM`` (``model.layers.{i}.``) or ``*Model``."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    attn_implementation = "sdpa"
    client_prefixes = {
        "embeddings": ("model.embed_tokens.", "embed_tokens."),
        "norm": ("model.norm.", "norm."),
        "lm_head": ("lm_head.",),
    }
    #: model_type -> (decoder layer, rotary embedding, RMSNorm) classes of transformers
    classes: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
        "llama": (LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm),
        "mistral": (MistralDecoderLayer, MistralRotaryEmbedding, MistralRMSNorm),
        "qwen2": (Qwen2DecoderLayer, Qwen2RotaryEmbedding, Qwen2RMSNorm),
    }

    def kv_shape(self, config: PreTrainedConfig) -> tuple[int, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return int(kv_heads), int(head_dim)

    def layer_types(self, span_config: PreTrainedConfig) -> list[str]:
        """Per span layer: "full_attention" or "sliding_attention" (as the transformers model decides it)."""
        layer_types = getattr(span_config, "layer_types", None)
        if layer_types is not None:
            return list(layer_types)
        sliding = getattr(span_config, "sliding_window", None) is not None
        return [SLIDING if sliding else FULL] * span_config.num_hidden_layers

    def layer_windows(self, span_config: PreTrainedConfig) -> list[int | None]:
        window = getattr(span_config, "sliding_window", None)
        return [window if t == SLIDING else None for t in self.layer_types(span_config)]

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return (f"model.layers.{index}.", f"layers.{index}.")

    def make_block(self, span_config: PreTrainedConfig, local_index: int) -> nn.Module:
        layer_class = self.classes[span_config.model_type][0]
        return layer_class(span_config, layer_idx=local_index)

    def make_position_module(self, span_config: PreTrainedConfig) -> nn.Module:
        rotary_class = self.classes[span_config.model_type][1]
        return rotary_class(config=span_config)

    def prepare(self, span_config: PreTrainedConfig, hidden_states: torch.Tensor, cache: Cache | None,
                past_length: int, position_module: nn.Module | None) -> dict[str, Any]:
        seq_length = hidden_states.shape[1]
        position_ids = (torch.arange(seq_length, device=hidden_states.device) + past_length).unsqueeze(0)
        mask_kwargs = dict(config=span_config, inputs_embeds=hidden_states, attention_mask=None, cache=cache,
                           position_ids=position_ids)
        masks = {}
        for layer_type in set(self.layer_types(span_config)):
            make_mask = create_sliding_window_causal_mask if layer_type == SLIDING else create_causal_mask
            masks[layer_type] = make_mask(**mask_kwargs)
        return {
            "position_ids": position_ids,
            "position_embeddings": position_module(hidden_states, position_ids),
            "masks": masks,
            "layer_types": self.layer_types(span_config),
        }

    def run_block(self, block: nn.Module, hidden_states: torch.Tensor, context: dict[str, Any],
                  cache: Cache | None, local_index: int) -> torch.Tensor:
        return block(
            hidden_states,
            attention_mask=context["masks"][context["layer_types"][local_index]],
            position_ids=context["position_ids"],
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=context["position_embeddings"],
        )

    def make_client_modules(self, config: PreTrainedConfig) -> dict[str, nn.Module]:
        norm_class = self.classes[config.model_type][2]
        return {
            "embeddings": nn.Embedding(config.vocab_size, config.hidden_size),
            "norm": norm_class(config.hidden_size, eps=config.rms_norm_eps),
            "lm_head": nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        }


LLAMA = register_family(LlamaFamily())
