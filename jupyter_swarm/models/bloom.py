"""The BLOOM family: LayerNorm, ALiBi positions, fused QKV, embedding LayerNorm on the client side.

The blocks are transformers' own ``BloomBlock``; positions enter as the ALiBi bias from transformers'
``build_alibi_tensor`` over all keys (cached + new), plus the eager causal mask from transformers' masking helpers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Cache, PreTrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from jupyter_swarm.models.family import ModelFamily, register_family


class BloomFamily(ModelFamily):
    """BLOOM checkpoints saved from ``BloomForCausalLM`` (``transformer.h.{i}.``) or ``BloomModel`` (``h.{i}.``)."""

    name = "bloom"
    model_types = ("bloom",)
    attn_implementation = "eager"  # BloomAttention is hand-written: it needs a materialised float mask
    client_prefixes = {
        "embeddings": ("transformer.word_embeddings.", "word_embeddings."),
        "embeddings_norm": ("transformer.word_embeddings_layernorm.", "word_embeddings_layernorm."),
        "norm": ("transformer.ln_f.", "ln_f."),
        "lm_head": ("lm_head.",),
    }

    def kv_shape(self, config: PreTrainedConfig) -> tuple[int, int]:
        return int(config.n_head), int(config.hidden_size // config.n_head)

    def block_prefixes(self, index: int) -> tuple[str, ...]:
        return (f"transformer.h.{index}.", f"h.{index}.")

    def make_block(self, span_config: PreTrainedConfig, local_index: int) -> nn.Module:
        return BloomBlock(span_config, layer_idx=local_index)

    def prepare(self, span_config: PreTrainedConfig, hidden_states: torch.Tensor, cache: Cache | None,
                past_length: int, position_module: nn.Module | None) -> dict[str, Any]:
        batch_size, seq_length, _ = hidden_states.shape
        kv_length = past_length + seq_length
        # no padding: every key is real, so the ALiBi bias is slope * key position
        all_keys = torch.ones(batch_size, kv_length, device=hidden_states.device, dtype=torch.long)
        alibi = build_alibi_tensor(all_keys, span_config.n_head, dtype=hidden_states.dtype)
        mask = create_causal_mask(config=span_config, inputs_embeds=hidden_states, attention_mask=None, cache=cache)
        return {"alibi": alibi, "mask": mask}

    def run_block(self, block: nn.Module, hidden_states: torch.Tensor, context: dict[str, Any],
                  cache: Cache | None, local_index: int) -> torch.Tensor:
        output, _attentions = block(hidden_states, alibi=context["alibi"], attention_mask=context["mask"],
                                    layer_past=cache, use_cache=cache is not None)
        return output

    def make_client_modules(self, config: PreTrainedConfig) -> dict[str, nn.Module]:
        return {
            "embeddings": nn.Embedding(config.vocab_size, config.hidden_size),
            "embeddings_norm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            "norm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            "lm_head": nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        }


BLOOM = register_family(BloomFamily())
