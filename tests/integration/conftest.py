"""Real swarms for integration tests: `jupyter-swarm serve` subprocesses talking libp2p over loopback TCP."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM

from jupyter_swarm import AutoDistributedModelForCausalLM
from jupyter_swarm.client.model import DistributedModelForCausalLM
from jupyter_swarm.local_swarm import LocalSwarm
from jupyter_swarm.models import make_tiny_model
from tests.integration.server_zygote import Zygote

SERVER_ARGS = ["--torch-threads", "1", "--update-period", "2"]

MODELS = {
    "llama": dict(family="llama", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, seed=3),
    "bloom": dict(family="bloom", hidden_size=64, num_layers=4, num_heads=4, seed=4, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    root = tmp_path_factory.mktemp("integration-models")
    return lambda name: make_tiny_model(str(root / name), **MODELS[name])


@pytest.fixture(scope="session")
def local_model() -> Callable[[str], torch.nn.Module]:
    cache: dict[str, torch.nn.Module] = {}

    def get(path: str) -> torch.nn.Module:
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return cache[path]

    return get


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """One pre-imported parent that forks `jupyter-swarm` server processes in a fraction of a second (for the
    tests that start many: the chaos soak, verified outputs); see server_zygote.py."""
    with Zygote(tmp_path_factory.mktemp("zygote")) as parent:
        yield parent


@pytest.fixture
def connect() -> Iterator[Callable[..., DistributedModelForCausalLM]]:
    """``connect(path, swarm)`` -> a distributed model; closed after the test."""
    models: list[DistributedModelForCausalLM] = []

    def make(path: str, swarm: LocalSwarm, **kwargs: object) -> DistributedModelForCausalLM:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, **kwargs)
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


def start_swarm(path: str, spans: list[tuple[int, int]], extra_args: Sequence[str] = (), **kwargs: object) -> LocalSwarm:
    return LocalSwarm(path, spans, extra_args=[*SERVER_ARGS, *extra_args], **kwargs)  # type: ignore[arg-type]
