"""Per-step timing instrumentation for bench_inference.py --profile (client side and server side).

Nothing here changes what the package computes, and nothing is copied from it: the hooks only wrap methods
(with ``*args, **kwargs``) and the send/recv of the streams they use, with perf_counter() calls around them, so
they keep working while the package changes.

Client side (installed in the bench process):
    forward    DistributedModelForCausalLM.forward: embed | session.step (sync, crosses into trio) | logits
    astep      InferenceSession.astep on the trio thread (the sync->trio portal costs step - astep)
    send_step  InferenceSession._send_step per span: encode+pack | stream.send | wait for the reply | unpack+decode
    local      the baseline model's forward, to compare against

Server side (installed in each `jupyter-swarm serve` subprocess through server_hook/sitecustomize.py):
    per step   frame received -> reply sent, split into: the hop into the compute thread, compute, the hop back,
               stream.send, and the rest (unpack, decode, checks, encode, pack).
Server records are written as JSON when the server exits (Ctrl-C / SIGINT from LocalSwarm.stop()).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections import defaultdict
from time import perf_counter
from typing import Any


def _seq_of(args: tuple, kwargs: dict) -> int:
    """Tokens in the step: dim 1 of the first 3-D tensor argument (the hidden states)."""
    for value in (*args, *kwargs.values()):
        if getattr(value, "dim", None) is not None and value.dim() == 3:
            return int(value.shape[1])
    return -1


def _time_stream(stream: Any, marks: dict[str, float]) -> None:
    """Wrap one FramedStream's send/recv (on the instance) to note when they start and end in ``marks``."""
    send, recv = stream.send, stream.recv

    async def timed_send(payload: bytes) -> None:
        marks["send_start"] = perf_counter()
        try:
            await send(payload)
        finally:
            marks["send_end"] = perf_counter()

    async def timed_recv() -> bytes:
        marks["recv_start"] = perf_counter()
        try:
            return await recv()
        finally:
            marks["recv_end"] = perf_counter()

    stream.send, stream.recv = timed_send, timed_recv


# ---------------------------------------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------------------------------------
class ClientProfile:
    """Timings (seconds) recorded in the bench process; :meth:`reset` after warm-up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enabled = True  # False: swarm-side records are dropped (the local model's are always kept)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.forward: list[dict[str, float]] = []  # per DistributedModelForCausalLM.forward
            self.astep: list[dict[str, float]] = []  # per InferenceSession.astep
            self.send_step: dict[int, list[dict[str, float]]] = defaultdict(list)  # span start -> per step
            self.local_forward: list[dict[str, float]] = []  # baseline model forward
            self.session_open: list[float] = []  # InferenceSession._open_chain
            self.route: list[float] = []  # SwarmClient.route (reads the swarm map when it is older than its max age)
            self.open_span: list[float] = []  # InferenceSession._open_span (new stream + "open" round trip)

    def add(self, kind: str, record: dict[str, float], key: int | None = None) -> None:
        if not self.enabled and kind != "local_forward":
            return
        with self.lock:
            if key is None:
                getattr(self, kind).append(record)
            else:
                getattr(self, kind)[key].append(record)


def install_client_hooks(profile: ClientProfile, local_model: Any) -> list[str]:
    """Instrument the distributed client classes and ``local_model``; returns what could not be instrumented."""
    from jupyter_swarm.client.inference import InferenceSession
    from jupyter_swarm.client.model import DistributedModelForCausalLM
    from jupyter_swarm.client.swarm import SwarmClient

    missing = [name for name in ("step", "astep", "_send_step", "_open_span", "_open_chain")
               if not hasattr(InferenceSession, name)]
    if missing:
        return [f"InferenceSession.{name}" for name in missing]

    # forward: split embed / session.step (sync) / logits by wrapping the head's methods on the instance
    original_forward = DistributedModelForCausalLM.forward
    original_step = InferenceSession.step
    state = threading.local()

    def forward(self: Any, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        state.parts = {"embed": 0.0, "step": 0.0, "logits": 0.0}
        head = self.head
        embed, logits = head.embed, head.logits

        def timed(fn: Any, part: str) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                t = perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    state.parts[part] += perf_counter() - t
            return wrapper

        head.embed, head.logits = timed(embed, "embed"), timed(logits, "logits")
        t0 = perf_counter()
        try:
            return original_forward(self, input_ids, *args, **kwargs)
        finally:
            total = perf_counter() - t0
            del head.embed, head.logits
            seq = int(input_ids.shape[1]) if input_ids is not None else -1
            profile.add("forward", {"seq": seq, "total": total, **state.parts})
            state.parts = None

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return original_step(self, *args, **kwargs)
        finally:
            if getattr(state, "parts", None) is not None:
                state.parts["step"] += perf_counter() - t

    original_astep = InferenceSession.astep

    async def astep(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        opened_before = bool(getattr(self, "_spans", True))
        try:
            return await original_astep(self, *args, **kwargs)
        finally:
            profile.add("astep", {"seq": _seq_of(args, kwargs), "total": perf_counter() - t,
                                  "opened_chain": float(not opened_before)})

    original_open_chain = InferenceSession._open_chain

    async def _open_chain(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return await original_open_chain(self, *args, **kwargs)
        finally:
            if profile.enabled:
                profile.session_open.append(perf_counter() - t)

    original_open_span = InferenceSession._open_span
    marks: dict[str, float] = {}  # only the trio thread touches it

    async def _open_span(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        span = await original_open_span(self, *args, **kwargs)
        if profile.enabled:
            profile.open_span.append(perf_counter() - t)
        _time_stream(span.stream, marks)
        return span

    original_route = SwarmClient.route

    async def route(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return await original_route(self, *args, **kwargs)
        finally:
            if profile.enabled:
                profile.route.append(perf_counter() - t)

    original_send_step = InferenceSession._send_step

    async def _send_step(self: Any, span: Any, *args: Any, **kwargs: Any) -> Any:
        marks.clear()
        t0 = perf_counter()
        out = await original_send_step(self, span, *args, **kwargs)
        t4 = perf_counter()
        if {"send_start", "send_end", "recv_start", "recv_end"} <= marks.keys():
            profile.add("send_step", {
                "seq": _seq_of(args, kwargs), "encode": marks["send_start"] - t0,
                "send": marks["send_end"] - marks["send_start"], "wait": marks["recv_end"] - marks["send_end"],
                "decode": t4 - marks["recv_end"], "total": t4 - t0, "wall": time.time()}, key=span.route.start)
        return out

    DistributedModelForCausalLM.forward = forward
    InferenceSession.step = step
    InferenceSession.astep = astep
    InferenceSession._open_chain = _open_chain
    InferenceSession._open_span = _open_span
    InferenceSession._send_step = _send_step
    SwarmClient.route = route

    local_forward = local_model.forward

    def timed_local_forward(input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return local_forward(input_ids, *args, **kwargs)
        finally:
            seq = int(input_ids.shape[1]) if input_ids is not None else -1
            profile.add("local_forward", {"seq": seq, "total": perf_counter() - t})

    local_model.forward = timed_local_forward
    return []


# ---------------------------------------------------------------------------------------------------------
# server (runs inside `jupyter-swarm serve`, see server_hook/sitecustomize.py)
# ---------------------------------------------------------------------------------------------------------
def install_server_hooks(out_path: str) -> None:
    """Instrument SpanService in this process; write the records to ``out_path`` at exit."""
    from jupyter_swarm.runtime.service import SpanService

    # decode steps go through _run_step (inline on the trio thread or to the compute thread); older versions: _run
    run_name = "_run_step" if hasattr(SpanService, "_run_step") else "_run"
    missing = [name for name in ("handle_inference", run_name) if not hasattr(SpanService, name)]
    records: list[dict[str, float]] = []
    current: dict[str, float] = {}  # the trio thread's current step (one session at a time in the benchmark)

    if not missing:
        original_run = getattr(SpanService, run_name)

        async def _run(self: Any, *call: Any, **kwargs: Any) -> Any:
            # _run_step(tokens, fn, *args) or _run(fn, *args)
            head, fn, args = (call[:1], call[1], call[2:]) if run_name == "_run_step" else ((), call[0], call[1:])
            box: dict[str, float] = {}

            def timed(*a: Any, **k: Any) -> Any:
                box["start"] = perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    box["end"] = perf_counter()

            t0 = perf_counter()
            result = await original_run(self, *head, timed, *args, **kwargs)
            t3 = perf_counter()
            if "end" in box:
                current.update(hop_in=box["start"] - t0, compute=box["end"] - box["start"], hop_out=t3 - box["end"],
                               seq=_seq_of(args, kwargs))
            return result

        original_handle = SpanService.handle_inference

        async def handle_inference(self: Any, stream: Any, *args: Any, **kwargs: Any) -> Any:
            send, recv = stream.send, stream.recv
            marks: dict[str, float] = {}

            async def timed_recv() -> bytes:
                payload = await recv()
                marks["received"] = perf_counter()
                current.clear()
                return payload

            async def timed_send(payload: bytes) -> None:
                t1 = perf_counter()
                await send(payload)
                t2 = perf_counter()
                if "compute" in current and "received" in marks:
                    t0 = marks.pop("received")
                    step = t1 - t0
                    rest = step - current["hop_in"] - current["compute"] - current["hop_out"]
                    records.append({"wall": time.time(), "start": self.span.start, "end": self.span.end,
                                    **current, "handle": t2 - t0, "step": step, "send": t2 - t1, "messages": rest})
                current.clear()

            stream.send, stream.recv = timed_send, timed_recv
            return await original_handle(self, stream, *args, **kwargs)

        setattr(SpanService, run_name, _run)
        SpanService.handle_inference = handle_inference

    def dump() -> None:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "not_instrumented": missing, "records": records}, f)

    atexit.register(dump)


# ---------------------------------------------------------------------------------------------------------
# CPU time per thread (Linux /proc), a measure that other processes on a shared machine disturb much less
# than wall time
# ---------------------------------------------------------------------------------------------------------
def thread_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process in ``pids`` ({label: pid}), by thread kind:
    "main" (the main thread), "compute" (trio's worker threads, named "Trio thread N"), "loop" (the rest: the
    trio thread that runs libp2p, plus any helper threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for label, pid in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            kind = "main" if int(tid) == pid else "compute" if comm.startswith("Trio thread") else "loop"
            out[f"{label}/{kind}"] = out.get(f"{label}/{kind}", 0.0) + seconds
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}
