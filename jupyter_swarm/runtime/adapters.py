"""Named LoRA adapters a server hosts on top of its frozen blocks; each request picks one (or none).

``jupyter-swarm serve MODEL --adapters NAME_OR_PATH ...`` loads peft-format adapters (``adapter_config.json`` and
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them) for the server's blocks only. An
adapter's name is the string given, or ``NAME`` in ``NAME=PATH``. Clients send ``active_adapter`` with each
forward/backward request or when opening an inference session; the server announces the names in its record,
so routing only sends a client to servers that have its adapter.

The LoRA update runs as a forward hook on each adapted linear layer: ``out + B(A(x)) * scaling``, the same
arithmetic as peft's ``lora.Linear`` (no dropout: servers run in eval mode). Hooks leave the blocks' weights and
state dicts untouched, so one copy of the blocks serves every adapter, and spans narrowed for a request get the
same hooks. The active adapter travels in a context variable, from the request's task to the compute thread.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from jupyter_swarm.errors import ConfigurationError, InvalidRequestError
from jupyter_swarm.models import BlockSpan, ModelFamily

#: the adapter of the request being computed (None: the plain blocks)
ACTIVE_ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("active_adapter", default=None)

_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,200}$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class _Lora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float


class ServedAdapters:
    """The LoRA weights of every hosted adapter, per (block index, module path inside the block)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._loras: dict[tuple[int, str], dict[str, _Lora]] = {}
        self._hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # narrowed views share the span's layers

    @classmethod
    def load(cls, specs: Sequence[str], family: ModelFamily, num_blocks: int, *, dtype: torch.dtype,
             device: str | torch.device = "cpu") -> "ServedAdapters":
        """Read the adapters named by ``specs`` (``PATH`` or ``NAME=PATH``), for all ``num_blocks`` blocks."""
        served = cls()
        for spec in specs:
            name, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (spec, spec)
            if not _NAME.match(name):
                raise ConfigurationError(f"adapter name {name!r} must be 1-200 letters, digits or _.-/")
            if name in served.names:
                raise ConfigurationError(f"adapter {name!r} is given twice")
            served._load_one(name, os.path.expanduser(path), family, num_blocks, dtype, torch.device(device))
            served.names.append(name)
        return served

    def _load_one(self, name: str, path: str, family: ModelFamily, num_blocks: int, dtype: torch.dtype,
                  device: torch.device) -> None:
        config_file = os.path.join(path, "adapter_config.json")
        weights_file = os.path.join(path, "adapter_model.safetensors")
        if not (os.path.isfile(config_file) and os.path.isfile(weights_file)):
            raise ConfigurationError(f"adapter {name!r}: {path} has no adapter_config.json and "
                                     "adapter_model.safetensors (save it with peft's save_pretrained)")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigurationError(f"adapter {name!r} is {config.get('peft_type')}; only LoRA is supported")
        r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(weights_file).items():
            key = key.removeprefix("base_model.model.")
            match = _LORA_KEY.match(key)
            if match is None:
                raise ConfigurationError(f"adapter {name!r}: unsupported weight {key!r} (only LoRA A/B of linear "
                                         "layers inside the blocks)")
            located = _locate(family, num_blocks, match["module"])
            if located is None:
                raise ConfigurationError(f"adapter {name!r}: weight {key!r} is not inside a block; "
                                         "only the blocks' layers can be adapted on servers")
            pairs.setdefault(located, {})[match["ab"]] = tensor.to(device=device, dtype=dtype)
        for (block, module), ab in pairs.items():
            if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
                raise ConfigurationError(
                    f"adapter {name!r}: block {block} {module} needs LoRA A [r, in] and B [out, r]")
            self._loras.setdefault((block, module), {})[name] = _Lora(ab["A"], ab["B"], scaling)

    def check(self, name: str | None) -> None:
        """Refuse a request for an adapter this server does not host."""
        if name is not None and name not in self.names:
            hosted = ", ".join(self.names) or "none"
            raise InvalidRequestError(f"adapter {name!r} is not served here (this server hosts: {hosted})")

    def attach(self, span: BlockSpan) -> None:
        """Hook every adapted layer of ``span``'s blocks (the span or a narrowed view of it), once per layer.

        Quantized layers (bitsandbytes' ``Linear8bitLt`` and ``Linear4bit`` are ``nn.Linear`` subclasses) are
        hooked like float ones: the LoRA update runs in the adapter's dtype on the layer's input.
        """
        for i, block in enumerate(span.blocks):
            index = span.start + i
            modules = dict(block.named_modules())
            for (block_index, path), loras in self._loras.items():
                if block_index != index:
                    continue
                module = modules.get(path)
                if module in self._hooked:
                    continue
                if not isinstance(module, nn.Linear):
                    raise ConfigurationError(f"adapter layer {path} of block {index} is not a linear layer here")
                for name, lora in loras.items():
                    if lora.a.shape[1] != module.in_features or lora.b.shape[0] != module.out_features:
                        raise ConfigurationError(f"adapter {name!r}: block {index} {path} LoRA shapes "
                                                 f"{list(lora.a.shape)}, {list(lora.b.shape)} do not fit "
                                                 f"{module.in_features} -> {module.out_features}")
                module.register_forward_hook(_make_hook(loras))
                self._hooked.add(module)


def _make_hook(loras: dict[str, _Lora]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        lora = loras.get(ACTIVE_ADAPTER.get())
        if lora is None:
            return None
        x = args[0]
        return output + (x.to(lora.a.dtype) @ lora.a.T @ lora.b.T * lora.scaling).to(output.dtype)

    return hook


def _locate(family: ModelFamily, num_blocks: int, module: str) -> tuple[int, str] | None:
    """(block index, module path inside the block) for a module path of the whole model."""
    for index in range(num_blocks):
        for prefix in family.block_prefixes(index):
            if module.startswith(prefix):
                return index, module[len(prefix):]
    return None
