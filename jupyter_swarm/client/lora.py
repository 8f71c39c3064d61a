"""LoRA adapters (through peft) on the parts of the model a client holds: token embeddings and LM head.

The blocks stay frozen on the servers; gradients for the embeddings' adapter come back through the swarm's
backward pass. Combine freely with prompt tuning (``tuning_mode``) and a classification head.

    from jupyter_swarm.client.lora import add_client_lora
    add_client_lora(model, r=8, lora_alpha=16)                 # adapters on "embeddings" and "lm_head"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

Needs the ``peft`` package (``pip install "jupyter-swarm[finetune]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from jupyter_swarm.errors import ConfigurationError

#: what the client holds, by the names of :class:`jupyter_swarm.models.ClientHead`
CLIENT_MODULES = ("embeddings", "lm_head")


def add_client_lora(model: nn.Module, config: Any = None, *, r: int = 8, lora_alpha: int = 16,
                    lora_dropout: float = 0.0, target_modules: Sequence[str] = CLIENT_MODULES,
                    adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a LoRA adapter to ``model.head`` (a distributed model's client parts); returns its trainable parameters.

    ``config``: a ``peft.LoraConfig`` to use as is; otherwise one is made from ``r``, ``lora_alpha``,
    ``lora_dropout`` and ``target_modules`` (names inside the client head: "embeddings", "lm_head").
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigurationError('client-side LoRA needs peft: pip install "jupyter-swarm[finetune]"') from None
    head = getattr(model, "head", None)
    if head is None:
        raise ConfigurationError("add_client_lora expects a distributed model (it adapts model.head)")
    if config is None:
        unknown = [m for m in target_modules if m not in CLIENT_MODULES]
        if unknown or not target_modules:
            raise ConfigurationError(f"target_modules must be among {CLIENT_MODULES} (what the client holds; the "
                                     f"blocks are frozen on the servers), got {list(target_modules)}")
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=list(target_modules))
    before = {id(p) for p in head.parameters()}
    inject_adapter_in_model(config, head, adapter_name=adapter_name)
    added = [p for p in head.parameters() if id(p) not in before]
    if not added:
        raise ConfigurationError(f"LoRA config {config} matched none of the client's modules {CLIENT_MODULES}")
    for p in added:
        p.requires_grad_(True)
    return added
