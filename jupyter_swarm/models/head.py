"""The parts of a model a client holds: embeddings in front of the blocks, final norm and LM head after them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig

from jupyter_swarm.models.checkpoint import Checkpoint, cast_floating, check_materialised
from jupyter_swarm.models.config import config_dtype, load_model_config
from jupyter_swarm.models.hub import HubOptions
from jupyter_swarm.models.family import ModelFamily, get_family

TIED = ("lm_head", "weight")


class ClientHead(nn.Module):
    """Token embeddings (plus BLOOM's embedding LayerNorm), final norm and LM head of a model.

    Make one with :meth:`load`. Weights are frozen (``requires_grad=False``); call ``requires_grad_(True)`` to
    train them. When ``config.tie_word_embeddings`` is set, the LM head shares the embedding matrix.

    Attributes:
        config: the model config. num_blocks: blocks in the whole model. hidden_size, vocab_size: its widths.
        embeddings, embeddings_norm (None unless the family has one), norm, lm_head: the modules.
    """

    def __init__(self, config: PreTrainedConfig, family: ModelFamily, modules: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        self.family = family
        self.num_blocks = family.num_blocks(config)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.embeddings = modules["embeddings"]
        self.embeddings_norm = modules.get("embeddings_norm")
        self.norm = modules["norm"]
        self.lm_head = modules["lm_head"]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights."""
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        """device of the weights."""
        return self.embeddings.weight.device

    @classmethod
    def load(cls, model: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             hub: HubOptions | None = None) -> ClientHead:
        """Load only the client parts of ``model`` (a local directory or hub id; ``hub``: which copy of it).

        Raises:
            UnsupportedModelError: ``model`` is not a supported causal LM.
            ConfigurationError: the checkpoint lacks some of the client parts.
        """
        config = load_model_config(model, hub)
        family = get_family(config)
        dtype = dtype or config_dtype(config)
        device = torch.device(device)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        with torch.device("meta"):
            modules = family.make_client_modules(config)
        checkpoint = Checkpoint.open(model, hub)
        for part, module in modules.items():
            local_names = [n for n in module.state_dict() if not (tied and (part, n) == TIED)]
            if not local_names:
                continue
            names = checkpoint.resolve(family.client_prefixes[part], local_names, what=f"the {part}")
            tensors = checkpoint.read(names.values(), device)
            module.load_state_dict({n: cast_floating(tensors[c], dtype) for n, c in names.items()},
                                   strict=not (tied and part == TIED[0]), assign=True)
        if tied:
            modules["lm_head"].weight = modules["embeddings"].weight
        head = cls(config, family, modules)
        check_materialised(head, f"client parts of {model!r}")
        return head.requires_grad_(False).eval()

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Hidden states ``[batch, seq, hidden]`` that the first block takes, for token ids ``[batch, seq]``."""
        hidden_states = self.embeddings(input_ids.to(self.device))
        if self.embeddings_norm is not None:
            hidden_states = self.embeddings_norm(hidden_states)
        return hidden_states

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., vocab]`` from the last block's output (applies the final norm and LM head)."""
        hidden_states = hidden_states.to(device=self.device, dtype=self.dtype)
        return self.lm_head(self.norm(hidden_states))
