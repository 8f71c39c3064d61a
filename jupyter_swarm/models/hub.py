"""Which copy of a hub checkpoint to read: revision, token, cache folder, offline (as transformers takes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from jupyter_swarm.errors import ConfigurationError


@dataclass(frozen=True)
class HubOptions:
    """``from_pretrained``'s hub arguments, passed on to every file the checkpoint is read from.

    They matter for hub ids only; a local directory is read as it is.
    """

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | None = None
    local_files_only: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoConfig.from_pretrained``, ``GenerationConfig.from_pretrained`` and
        ``huggingface_hub.hf_hub_download`` (only those that were set)."""
        values = {"revision": self.revision, "token": self.token, "cache_dir": self.cache_dir}
        options = {name: value for name, value in values.items() if value is not None}
        if self.local_files_only:
            options["local_files_only"] = True
        return options


def resolve_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None = None) -> torch.dtype | None:
    """The dtype ``from_pretrained(dtype=..., torch_dtype=...)`` asks for; None means the checkpoint's own.

    Accepts torch dtypes, their names (``"float16"``, ``"torch.bfloat16"``) and ``"auto"``; ``torch_dtype`` is
    transformers' older name for the same argument.
    """
    if dtype is not None and torch_dtype is not None and _parse_dtype(dtype) != _parse_dtype(torch_dtype):
        raise ConfigurationError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
    return _parse_dtype(dtype if dtype is not None else torch_dtype)


def _parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        if value == "auto":
            return None
        found = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(found, torch.dtype) and found.is_floating_point:
            return found
    raise ConfigurationError(f"dtype must be a floating-point torch dtype, its name (e.g. 'float16', 'bfloat16') "
                             f"or 'auto', got {value!r}")
