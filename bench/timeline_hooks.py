"""Timestamps for bench_timeline.py: when each frame is received and sent, and when each step's compute starts
and ends, in the client and in every server. ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in
every process of the machine, so the events of all processes line up into one timeline per token.

Like profile_hooks.py, this only wraps package methods (nothing is copied), so it keeps working while the package
changes.
"""

from __future__ import annotations

import atexit
import json
from time import perf_counter
from typing import Any

Events = list[tuple[str, float]]


def _wrap_stream(events: Events) -> None:
    from jupyter_swarm.p2p.framing import FramedStream

    send, recv = FramedStream.send, FramedStream.recv

    async def timed_send(self: Any, payload: bytes) -> None:
        events.append(("send0", perf_counter()))
        try:
            await send(self, payload)
        finally:
            events.append(("send1", perf_counter()))

    async def timed_recv(self: Any) -> bytes:
        payload = await recv(self)
        events.append(("recv", perf_counter()))
        return payload

    FramedStream.send, FramedStream.recv = timed_send, timed_recv


def install_client_hooks(events: Events) -> None:
    """Client side: the sync step (main thread), its trio twin, and frames."""
    from jupyter_swarm.client.inference import InferenceSession

    step, astep = InferenceSession.step, InferenceSession.astep

    def timed_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(("step0", perf_counter()))
        try:
            return step(self, *args, **kwargs)
        finally:
            events.append(("step1", perf_counter()))

    async def timed_astep(self: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(("astep0", perf_counter()))
        try:
            return await astep(self, *args, **kwargs)
        finally:
            events.append(("astep1", perf_counter()))

    InferenceSession.step, InferenceSession.astep = timed_step, timed_astep
    _wrap_stream(events)


def install_server_hooks(out_path: str) -> None:
    """Server side (loaded by server_hook/sitecustomize.py): frames and the compute of each inference step."""
    from jupyter_swarm.runtime.service import SpanService

    events: Events = []
    compute = SpanService._inference_step

    def timed_compute(*args: Any) -> Any:
        events.append(("c0", perf_counter()))
        try:
            return compute(*args)
        finally:
            events.append(("c1", perf_counter()))

    SpanService._inference_step = staticmethod(timed_compute)
    _wrap_stream(events)

    def dump() -> None:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(events, f)

    atexit.register(dump)
