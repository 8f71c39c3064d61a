"""Tiny models shared by the models tests (built once per test session, in a temporary directory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from jupyter_swarm.models import make_tiny_model

#: name -> make_tiny_model arguments of the models the tests use
TINY_MODELS: dict[str, dict] = {
    "llama": dict(family="llama", num_layers=4, num_heads=4, num_kv_heads=2),
    "llama-tied": dict(family="llama", num_layers=4, num_heads=4, num_kv_heads=4, tie_word_embeddings=True, seed=1),
    "llama-8-sharded": dict(family="llama", num_layers=8, shard_size="40KB", seed=2),
    "bloom": dict(family="bloom", num_layers=4, num_heads=4, tie_word_embeddings=True),  # as real BLOOM
    "mistral": dict(family="mistral", num_layers=4, config_overrides={"sliding_window": 4}),
    "qwen2": dict(family="qwen2", num_layers=4,
                  config_overrides={"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny(name)`` -> path of the tiny model ``name`` of TINY_MODELS (made on first use)."""
    root = tmp_path_factory.mktemp("tiny-models")

    def get(name: str) -> str:
        return make_tiny_model(str(root / name), **TINY_MODELS[name])

    return get


@pytest.fixture(scope="session")
def reference() -> Callable[[str], torch.nn.Module]:
    """``reference(path)`` -> the whole model loaded by transformers itself (cached per path)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    models: dict[str, torch.nn.Module] = {}

    def get(path: str) -> torch.nn.Module:
        if path not in models:
            models[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return models[path]

    return get


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama-shaped or BLOOM)."""
    base = getattr(model, "model", None) or model.transformer
    return base.layers if hasattr(base, "layers") else base.h


def run_layers(model: torch.nn.Module, input_ids: torch.Tensor, first: int, last: int,
               replace_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole transformers model; return (input of layer ``first``, output of layer ``last - 1``).

    With ``replace_input``, that tensor is fed to layer ``first`` instead (e.g. a leaf that requires grad).
    """
    layers = decoder_layers(model)
    seen: dict[str, torch.Tensor] = {}

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if replace_input is not None:
            hidden = replace_input
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        seen["input"] = hidden
        return args, kwargs

    def after(module, args, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output

    handles = [layers[first].register_forward_pre_hook(before, with_kwargs=True),
               layers[last - 1].register_forward_hook(after)]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen["input"], seen["output"]


@pytest.fixture(scope="session")
def layers_io() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The :func:`run_layers` helper, as a fixture (test modules do not import conftest)."""
    return run_layers
