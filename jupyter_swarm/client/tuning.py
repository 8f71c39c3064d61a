"""Trainable prompts a client holds while the servers keep every block frozen (prompt tuning, deep prompt tuning).

``ptune``: ``pre_seq_len`` trainable vectors are prepended to the input embeddings (before BLOOM's embedding
LayerNorm, exactly as ``inputs_embeds`` enter a transformers model). ``deep_ptune``: the same, plus trainable
vectors added to the first ``pre_seq_len`` hidden states before every block after the first; the servers add
them (they travel with each forward/backward request) and return their gradients. Logits and loss cover only
the real tokens: the prompt positions are dropped after the last block.
"""

from __future__ import annotations

import torch
from torch import nn

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import ClientHead

TUNING_MODES = (None, "ptune", "deep_ptune")


class PromptTuning(nn.Module):
    """The trainable prompts of one tuning mode.

    Attributes:
        prompt_embeddings: ``[pre_seq_len, hidden]``, prepended to the input embeddings.
        intermediate_prompts: (``deep_ptune`` only) ``[num_blocks - 1, pre_seq_len, hidden]``; row ``i`` is added
            before block ``i + 1`` (block 0 already sees ``prompt_embeddings``).
    """

    def __init__(self, mode: str, pre_seq_len: int, num_blocks: int, hidden_size: int, *,
                 init_std: float = 0.02, dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in ("ptune", "deep_ptune"):
            raise ConfigurationError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if not isinstance(pre_seq_len, int) or pre_seq_len <= 0:
            raise ConfigurationError(f"tuning_mode={mode!r} needs pre_seq_len >= 1, got {pre_seq_len!r}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        self.num_blocks = num_blocks
        self.prompt_embeddings = nn.Parameter(torch.randn(pre_seq_len, hidden_size, dtype=dtype) * init_std)
        self.intermediate_prompts: nn.Parameter | None = None
        if mode == "deep_ptune":
            self.intermediate_prompts = nn.Parameter(
                torch.randn(max(0, num_blocks - 1), pre_seq_len, hidden_size, dtype=dtype) * init_std)

    def input_hidden(self, head: ClientHead, input_ids: torch.Tensor | None,
                     inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Hidden states for block 0 with the prompts in front: ``[batch, pre_seq_len + seq, hidden]``."""
        embeds = head.embeddings(input_ids.to(head.device)) if inputs_embeds is None else inputs_embeds
        prompts = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        hidden = torch.cat([prompts, embeds], dim=1)
        if head.embeddings_norm is not None:
            hidden = head.embeddings_norm(hidden)
        return hidden

    def block_prompts(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Deep prompts for every block, ``[num_blocks, 1, pre_seq_len, hidden]`` (block 0's are zeros), or None."""
        if self.intermediate_prompts is None:
            return None
        first = torch.zeros_like(self.prompt_embeddings).unsqueeze(0)
        return torch.cat([first, self.intermediate_prompts], dim=0).to(dtype).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pre_seq_len={self.pre_seq_len}"


def make_prompt_tuning(mode: str | None, pre_seq_len: int, head: ClientHead) -> PromptTuning | None:
    """The prompts for ``mode`` (None for no prompt tuning), initialised at the scale of the token embeddings."""
    if mode is None:
        if pre_seq_len:
            raise ConfigurationError("pre_seq_len needs tuning_mode='ptune' or 'deep_ptune'")
        return None
    std = float(head.embeddings.weight.float().std())
    return PromptTuning(mode, pre_seq_len, head.num_blocks, head.hidden_size, init_std=std, dtype=head.dtype)
