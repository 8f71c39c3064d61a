"""Loaded by every `jupyter-swarm serve` that bench_inference.py --profile or bench_timeline.py starts (they put this
folder on PYTHONPATH); installs the server-side timers of bench/profile_hooks.py when JUPYTER_SWARM_BENCH_PROFILE is
set, and the timestamps of bench/timeline_hooks.py when JUPYTER_SWARM_BENCH_TIMELINE is set."""

import os
import sys

_profile = os.environ.get("JUPYTER_SWARM_BENCH_PROFILE")
_timeline = os.environ.get("JUPYTER_SWARM_BENCH_TIMELINE")
if _profile or _timeline:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _profile:
    from profile_hooks import install_server_hooks

    install_server_hooks(f"{_profile}.{os.getpid()}.json")
if _timeline:
    import timeline_hooks

    timeline_hooks.install_server_hooks(f"{_timeline}.{os.getpid()}.json")
