"""Loaded by every `jupyter-swarm serve` that bench_inference.py --profile starts (it puts this folder on
PYTHONPATH); installs the server-side timers of bench/profile_hooks.py when JUPYTER_SWARM_BENCH_PROFILE is set."""

import os
import sys

_out = os.environ.get("JUPYTER_SWARM_BENCH_PROFILE")
if _out:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from profile_hooks import install_server_hooks

    install_server_hooks(f"{_out}.{os.getpid()}.json")
