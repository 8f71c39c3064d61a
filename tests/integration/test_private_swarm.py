"""A private swarm end to end: `jupyter-swarm keygen`, servers started with --swarm-key, clients with and without it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from jupyter_swarm import AutoDistributedModelForCausalLM
from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.swarm_key import ENV_VAR, write_swarm_key
from tests.integration.conftest import start_swarm

PROMPT = torch.tensor([[1, 17, 42, 99]])


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jupyter_swarm.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_private_swarm_refuses_peers_without_its_key(model_path, local_model, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = model_path("llama")
    key_file = tmp_path / "swarm.key"
    made = _cli("keygen", str(key_file))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = _cli("keygen", str(key_file))
    assert again.returncode == 2 and "already exists" in again.stderr
    wrong_file = tmp_path / "other.key"
    write_swarm_key(wrong_file)

    with start_swarm(path, [(0, 4)], swarm_key=str(key_file)) as swarm:
        assert any("private swarm" in line for line in swarm.servers[0].output)
        peers = swarm.initial_peers
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, swarm_key=str(key_file))
        try:
            got = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        finally:
            model.close()
        assert got.tolist() == local_model(path).generate(PROMPT, max_new_tokens=4, do_sample=False).tolist()

        for key in (None, str(wrong_file)):
            with pytest.raises(PeerUnavailableError, match="same swarm key"):
                AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, swarm_key=key)

        # the CLI: the option, the environment variable, and neither
        assert "blocks 0:4" in _cli("status", "--initial-peers", *peers, "--swarm-key", str(key_file)).stdout
        assert "blocks 0:4" in _cli("status", "--initial-peers", *peers, env={ENV_VAR: str(key_file)}).stdout
        refused = _cli("status", "--initial-peers", *peers)
        assert refused.returncode == 2 and "same swarm key" in refused.stderr
        assert swarm.servers[0].process.poll() is None  # refusing peers never hurts the server
