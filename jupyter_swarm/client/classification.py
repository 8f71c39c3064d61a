"""Sequence classification through the swarm: a trainable score head on the last token, held by the client.

Like transformers' ``*ForSequenceClassification``: the final norm, then a bias-free linear ``score`` layer
``hidden -> num_labels`` on the last token of each row. The blocks stay frozen on the servers; the score head
(and any prompts of ``tuning_mode``) are what a client trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from jupyter_swarm.client.model import DistributedModelForCausalLM
from jupyter_swarm.client.swarm import SwarmClient
from jupyter_swarm.client.tuning import PromptTuning
from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import ClientHead
from jupyter_swarm.wire.tensors import Compression


class DistributedModelForSequenceClassification(DistributedModelForCausalLM):
    """Classifies whole sequences; build it with ``from_pretrained(path, initial_peers=..., num_labels=N)``.

    ``score`` is initialised like transformers does (normal, std ``config.initializer_range``) and trainable.
    ``config.problem_type`` picks the loss as in transformers: regression (``num_labels == 1``), single-label
    (integer labels) or multi-label (float labels).
    """

    def __init__(self, config: PretrainedConfig, head: ClientHead, swarm: SwarmClient,
                 compression: Compression = Compression.NONE, tuning: PromptTuning | None = None,
                 num_labels: int = 2):
        super().__init__(config, head, swarm, compression, tuning)
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigurationError(f"num_labels must be a positive integer, got {num_labels!r}")
        self.config.num_labels = num_labels
        self.num_labels = num_labels
        self.score = nn.Linear(head.hidden_size, num_labels, bias=False, dtype=head.dtype)
        std = float(getattr(config, "initializer_range", 0.02))
        with torch.no_grad():
            self.score.weight.normal_(0.0, std)

    @classmethod
    def _extra_arguments(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"num_labels": kwargs.pop("num_labels", 2)}

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError("a sequence classification model does not generate text; "
                                 "use AutoDistributedModelForCausalLM for generation")

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutputWithPast:
        """Logits ``[batch, num_labels]`` from the last token of each row (rows must have equal lengths)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConfigurationError("padded batches are not supported yet: give every row the same length")
        hidden = self.blocks_output(input_ids, inputs_embeds)[:, -1]
        hidden = self.head.norm(hidden.to(device=self.head.device, dtype=self.head.dtype))
        logits = self.score(hidden)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem
        if problem == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


class AutoDistributedModelForSequenceClassification:
    """``AutoDistributedModelForSequenceClassification.from_pretrained(path, initial_peers=[...], num_labels=2)``."""

    @staticmethod
    def from_pretrained(model: str, **kwargs: Any) -> DistributedModelForSequenceClassification:
        return DistributedModelForSequenceClassification.from_pretrained(model, **kwargs)
