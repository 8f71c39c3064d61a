"""`jupyter-swarm demo` as a user runs it: three servers start, text streams through them, everything stops.

The random `tiny` model keeps this test free of real weights (the real model's chat turn: test_real_model.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_command_generates_through_three_servers_and_chats_on(tmp_path) -> None:
    from jupyter_swarm.runtime.throughput import CACHE_ENV, cache_path

    # its own cache folder (the tiny model is made there on first use), but the usual throughput measurements
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), CACHE_ENV: str(cache_path())}
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_swarm.cli", "demo", "--model", "tiny", "--max-new-tokens", "6", "--chat",
         "--prompt", "Once upon a time"],
        input="The swarm\n\n", capture_output=True, text=True, env=env, timeout=240)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started 3 servers for the model's 8 blocks" in out
    assert out.count("chain of servers: client -> ") == 2  # the first prompt, then one typed line
    assert "Once upon a time" in out and "The swarm" in out and out.rstrip().endswith("all servers stopped")
    assert (tmp_path / "jupyter-swarm" / "models" / "tiny-llama" / "config.json").is_file()


def test_demo_rejects_bad_options() -> None:
    done = subprocess.run([sys.executable, "-m", "jupyter_swarm.cli", "demo", "--max-new-tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--max-new-tokens must be at least 1" in done.stderr
