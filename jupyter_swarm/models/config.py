"""Reading a model's config from a local directory or a Hugging Face hub id, and checking we can serve it."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, PreTrainedConfig

from jupyter_swarm.errors import UnsupportedModelError
from jupyter_swarm.models.family import get_family, supported_model_types
from jupyter_swarm.models.hub import HubOptions


def is_local_model(model: str) -> bool:
    """True when ``model`` names a local directory (rather than a hub id)."""
    return os.path.isdir(os.path.expanduser(model))


def looks_like_path(model: str) -> bool:
    """True when ``model`` is written like a filesystem path, so it cannot be a hub id ("org/name" or "name")."""
    if os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model or os.path.exists(model):
        return True
    return model.count("/") > 1


def load_model_config(model: str, hub: HubOptions | None = None) -> PreTrainedConfig:
    """Load the config of ``model`` (a local directory or a hub id) and check it is a causal LM we can serve.

    ``hub``: the revision, token, cache folder and offline flag to read a hub id with.

    Raises:
        UnsupportedModelError: ``model`` is not a directory and not a reachable hub id, or it is not a causal LM
            of a supported family (the message names its ``model_type`` and the supported ones).
    """
    if is_local_model(model):
        path = os.path.expanduser(model)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise UnsupportedModelError(
                f"{model!r} is a directory without a config.json, so it is not a transformers checkpoint")
        model_type = _read_model_type(config_file)
        if model_type not in supported_model_types():
            raise _unsupported(model, model_type)
        config = AutoConfig.from_pretrained(path)
    else:
        if looks_like_path(model):
            raise UnsupportedModelError(f"{model!r} is not a directory and not a reachable hub id")
        try:
            config = AutoConfig.from_pretrained(model, **(hub or HubOptions()).kwargs())
        except (OSError, ValueError) as e:  # hub errors are OSError subclasses; unknown model types are ValueError
            raise UnsupportedModelError(
                f"{model!r} is not a directory and not a reachable hub id ({type(e).__name__}: {e})") from e
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model!r} is an encoder-decoder model; only decoder-only causal LMs are served")
    try:
        get_family(config)
    except UnsupportedModelError as e:
        raise _unsupported(model, getattr(config, "model_type", None)) from e
    return config


def config_dtype(config: PreTrainedConfig) -> torch.dtype:
    """The dtype the checkpoint was saved in (``config.dtype``, formerly ``torch_dtype``), float32 if unknown."""
    value = getattr(config, "dtype", None)
    if value is None:
        value = config.__dict__.get("torch_dtype")
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    return torch.float32


def _read_model_type(config_file: str) -> str | None:
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot read {config_file}: {e}") from e


def _unsupported(model: str, model_type: str | None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{model!r} has model_type {model_type!r}, which is not a supported causal LM family; "
        f"supported model types: {', '.join(supported_model_types())}")
