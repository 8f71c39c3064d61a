"""Reading chosen tensors of a checkpoint (local directory or hub id) without loading the rest.

Supported layouts, in order of preference: sharded safetensors (``model.safetensors.index.json``), a single
``model.safetensors``, sharded ``pytorch_model.bin.index.json`` and a single ``pytorch_model.bin``. For a hub id,
only the files that hold the requested tensors are downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import torch
from safetensors import safe_open

from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models.config import is_local_model
from jupyter_swarm.models.hub import HubOptions

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"


class Checkpoint:
    """The weight files of one checkpoint: which file holds each tensor, and reading tensors by name.

    Attributes:
        model: the directory or hub id it was opened from.
        weight_map: checkpoint tensor name -> file name (relative to the checkpoint root).
    """

    def __init__(self, model: str, fetch: _LocalFiles | _HubFiles, weight_map: dict[str, str]):
        self.model = model
        self.weight_map = weight_map
        self._fetch = fetch

    @classmethod
    def open(cls, model: str, hub: HubOptions | None = None) -> Checkpoint:
        """Find the weight files of ``model`` (reads only index files or safetensors headers); ``hub``: which copy
        of a hub id to read."""
        fetch = _LocalFiles(model) if is_local_model(model) else _HubFiles(model, hub or HubOptions())
        if index := fetch(SAFETENSORS_INDEX):
            weight_map = _read_index(index)
        elif path := fetch(SAFETENSORS_FILE):
            with safe_open(path, framework="pt") as f:
                weight_map = {name: SAFETENSORS_FILE for name in f.keys()}
        elif index := fetch(BIN_INDEX):
            weight_map = _read_index(index)
        elif path := fetch(BIN_FILE):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            weight_map = {name: BIN_FILE for name in state}
        else:
            raise ConfigurationError(
                f"no weights found for {model!r}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_FILE}, "
                f"{BIN_INDEX} or {BIN_FILE}"
                + (" (the hub could not be reached and they are not in the local hub cache)" if fetch.unreachable
                   else ""))
        return cls(model, fetch, weight_map)

    @property
    def names(self) -> set[str]:
        """All tensor names in the checkpoint."""
        return set(self.weight_map)

    def resolve(self, prefixes: Sequence[str], local_names: Iterable[str], what: str) -> dict[str, str]:
        """Map a module's own parameter names to checkpoint names, trying each prefix in turn.

        The first prefix under which the checkpoint holds any of ``local_names`` is used for all of them, so a
        checkpoint saved with or without the base-model prefix (``model.``, ``transformer.``) both work.

        Raises:
            ConfigurationError: some names are missing under every prefix (``what`` names the part in the message).
        """
        local_names = list(local_names)
        for prefix in prefixes:
            if any(prefix + name in self.weight_map for name in local_names):
                missing = [name for name in local_names if prefix + name not in self.weight_map]
                if missing:
                    raise ConfigurationError(
                        f"checkpoint {self.model!r} lacks tensors of {what}: "
                        f"{', '.join(prefix + name for name in missing)}")
                return {name: prefix + name for name in local_names}
        raise ConfigurationError(
            f"checkpoint {self.model!r} has no tensors of {what} (looked for names starting with "
            f"{' or '.join(repr(p) for p in prefixes)})")

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors (and nothing else) onto ``device``."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise ConfigurationError(f"checkpoint {self.model!r} has no tensor named {name!r}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, file_names in by_file.items():
            path = self._fetch(file_name)
            if path is None:
                raise ConfigurationError(f"checkpoint {self.model!r} lists {file_name} in its index, but it is missing")
            if file_name.endswith(".safetensors"):
                with safe_open(path, framework="pt", device=str(device)) as f:
                    for name in file_names:
                        tensors[name] = f.get_tensor(name)
            else:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                for name in file_names:
                    tensors[name] = state[name].to(device)
                del state
        return tensors


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is a floating-point tensor, else unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def check_materialised(module: torch.nn.Module, what: str) -> None:
    """Raise :class:`ConfigurationError` if some parameter or buffer of ``module`` is still on the meta device."""
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ConfigurationError(f"{what}: no weights were loaded for {', '.join(left)}")


def _read_index(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f)["weight_map"])


class _LocalFiles:
    """Files of a checkpoint directory."""

    def __init__(self, model: str):
        self.root = os.path.expanduser(model)
        self.unreachable = False

    def __call__(self, file_name: str) -> str | None:
        path = os.path.join(self.root, file_name)
        return path if os.path.isfile(path) else None


class _HubFiles:
    """Files of a hub repository, downloaded (or taken from the local hub cache) on first use."""

    def __init__(self, model: str, hub: HubOptions):
        self.model = model
        self.hub = hub
        self.unreachable = False  # set when a file was neither cached nor downloadable (offline?)

    def __call__(self, file_name: str) -> str | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return hf_hub_download(repo_id=self.model, filename=file_name, **self.hub.kwargs())
        except LocalEntryNotFoundError:  # offline, or the hub is unreachable, and the file is not cached
            self.unreachable = True
            return None
        except EntryNotFoundError:  # the repository has no such file
            return None
        except (OSError, ValueError) as e:  # missing or gated repository, network errors, invalid ids
            raise ConfigurationError(f"cannot download {file_name} of {self.model!r}: {e}") from e
