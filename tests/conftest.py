"""Shared test set-up: the tests never reach a model hub. Fixtures every test folder can use."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct checkpoint as a transformers directory (30 Llama blocks, chat template).

    Converted once per machine into the user cache by :func:`jupyter_swarm.models.smollm2.smollm2_path` (the
    same code the demo uses; the weights come from the package index, never a model hub) and shared by every
    test. Mark tests that use it ``@pytest.mark.real_model``.
    """
    from jupyter_swarm.models.smollm2 import smollm2_path

    return smollm2_path(progress=False)
