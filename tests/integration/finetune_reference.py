"""Local references for fine-tuning tests: transformers' own model with the same prompt injection as the swarm."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from jupyter_swarm.client.tuning import PromptTuning


def decoder_layers(local: nn.Module) -> nn.ModuleList:
    base = local.base_model
    return base.layers if hasattr(base, "layers") else base.h


@contextlib.contextmanager
def deep_prompt_hooks(local: nn.Module, prompts: torch.Tensor | None, *,
                      first_call_only: bool = False) -> Iterator[None]:
    """Add ``prompts[i]`` ([num_blocks, 1, pre_seq_len, hidden]) to the first tokens before decoder layer ``i``.

    ``first_call_only``: only on each layer's first call (the prefill of a generation; later steps see no prompts).
    """
    handles = []
    if prompts is not None:
        for i, layer in enumerate(decoder_layers(local)):
            calls = [0]

            def hook(module, args, kwargs, i=i, calls=calls):
                calls[0] += 1
                if first_call_only and calls[0] > 1:
                    return None
                hidden = args[0] if args else kwargs["hidden_states"]
                length = min(prompts.shape[2], hidden.shape[1])
                hidden = torch.cat([hidden[:, :length] + prompts[i][:, :length], hidden[:, length:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LocalPrompts(nn.Module):
    """Leaf copies of a :class:`PromptTuning`'s parameters, to differentiate the local model against."""

    def __init__(self, tuning: PromptTuning):
        super().__init__()
        self.pre_seq_len = tuning.pre_seq_len
        self.prompt_embeddings = nn.Parameter(tuning.prompt_embeddings.detach().clone())
        self.intermediate_prompts = (None if tuning.intermediate_prompts is None
                                     else nn.Parameter(tuning.intermediate_prompts.detach().clone()))

    def block_prompts(self) -> torch.Tensor | None:
        if self.intermediate_prompts is None:
            return None
        first = torch.zeros_like(self.prompt_embeddings).unsqueeze(0)
        return torch.cat([first, self.intermediate_prompts], dim=0).unsqueeze(1)

    def inputs_embeds(self, local: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = local.get_input_embeddings()(input_ids)
        return torch.cat([self.prompt_embeddings.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)

    def hidden(self, local: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states (after the final norm) of the real tokens."""
        with deep_prompt_hooks(local, self.block_prompts()):
            out = local.base_model(inputs_embeds=self.inputs_embeds(local, input_ids))
        return out.last_hidden_state[:, self.pre_seq_len:]

    def logits(self, local: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return local.get_output_embeddings()(self.hidden(local, input_ids))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
