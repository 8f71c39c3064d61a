"""Per-step timing instrumentation for bench_inference.py --profile (client side and server side).

Nothing here changes what the package computes: each hook either wraps a method with perf_counter() calls or is
a line-for-line copy of a small package method with timers added. The copies are checked against a hash of the
package source they mirror, and a warning is printed when the package has changed since (re-copy them then).

Client side (installed in the bench process):
    forward   DistributedModelForCausalLM.forward: embed | session.step (sync, crosses into trio) | logits
    astep     InferenceSession.astep on the trio thread (the sync->trio portal costs step - astep)
    send_step InferenceSession._send_step per span: encode+pack | stream.send | wait for the reply | unpack+decode
    local     the baseline model's forward, to compare against

Server side (installed in each `jupyter-swarm serve` subprocess through server_hook/sitecustomize.py):
    handle    frame received -> reply sent, split into unpack/decode/validate, the hop into the compute thread,
              compute, the hop back, encode+pack, stream.send.
Server records are written as JSON when the server exits (Ctrl-C / SIGINT from LocalSwarm.stop()).
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import os
import statistics
import threading
import time
from collections import defaultdict
from typing import Any

from time import perf_counter

# sha256 (first 12 hex digits) of the package methods copied below, as they were when the copies were made
_EXPECTED_SOURCES = {
    "jupyter_swarm.client.inference.InferenceSession._send_step": "9fe00c286f19",
    "jupyter_swarm.runtime.service.SpanService._serve_session": "a3b810ae3bb8",
    "jupyter_swarm.runtime.service.SpanService._run": "b6cbe164e5cc",
}


def _source_hash(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def check_copies(objs: dict[str, Any]) -> list[str]:
    """Names of copied methods whose package source changed since the copy was made."""
    return [name for name, obj in objs.items() if _source_hash(obj) != _EXPECTED_SOURCES.get(name)]


# ---------------------------------------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------------------------------------
class ClientProfile:
    """Timings (seconds) recorded in the bench process; :meth:`reset` after warm-up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.forward: list[dict[str, float]] = []  # per DistributedModelForCausalLM.forward
            self.astep: list[dict[str, float]] = []  # per InferenceSession.astep
            self.send_step: dict[int, list[dict[str, float]]] = defaultdict(list)  # span start -> per step
            self.local_forward: list[dict[str, float]] = []  # baseline model forward
            self.session_open: list[float] = []  # InferenceSession._open_chain

    def add(self, kind: str, record: dict[str, float], key: int | None = None) -> None:
        with self.lock:
            if key is None:
                getattr(self, kind).append(record)
            else:
                getattr(self, kind)[key].append(record)


def install_client_hooks(profile: ClientProfile, local_model: Any) -> list[str]:
    """Instrument the distributed client classes and ``local_model``; returns names of stale copies."""
    import trio

    from jupyter_swarm.client import inference as inference_module
    from jupyter_swarm.client.inference import InferenceSession
    from jupyter_swarm.client.model import DistributedModelForCausalLM
    from jupyter_swarm.wire.messages import field as message_field
    from jupyter_swarm.wire.messages import pack, unpack
    from jupyter_swarm.wire.tensors import decode_tensor, encode_tensor

    stale = check_copies({"jupyter_swarm.client.inference.InferenceSession._send_step": InferenceSession._send_step})

    # forward: split embed / session.step (sync) / logits by wrapping the head and the session's step()
    original_forward = DistributedModelForCausalLM.forward
    original_step = InferenceSession.step
    state = threading.local()

    def forward(self: Any, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        state.parts = {"embed": 0.0, "step": 0.0, "logits": 0.0}
        head = self.head
        embed, logits = head.embed, head.logits

        def timed_embed(*a: Any, **k: Any) -> Any:
            t = perf_counter()
            try:
                return embed(*a, **k)
            finally:
                state.parts["embed"] += perf_counter() - t

        def timed_logits(*a: Any, **k: Any) -> Any:
            t = perf_counter()
            try:
                return logits(*a, **k)
            finally:
                state.parts["logits"] += perf_counter() - t

        head.embed, head.logits = timed_embed, timed_logits
        t0 = perf_counter()
        try:
            return original_forward(self, input_ids, *args, **kwargs)
        finally:
            total = perf_counter() - t0
            del head.embed, head.logits
            seq = int(input_ids.shape[1]) if input_ids is not None else -1
            profile.add("forward", {"seq": seq, "total": total, **state.parts})

    def step(self: Any, hidden: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return original_step(self, hidden, **kwargs)
        finally:
            if getattr(state, "parts", None) is not None:
                state.parts["step"] += perf_counter() - t

    original_astep = InferenceSession.astep

    async def astep(self: Any, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        opened_before = bool(self._spans)
        try:
            return await original_astep(self, hidden, *args, **kwargs)
        finally:
            profile.add("astep", {"seq": int(hidden.shape[1]), "total": perf_counter() - t,
                                  "opened_chain": float(not opened_before)})

    original_open_chain = InferenceSession._open_chain

    async def _open_chain(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return await original_open_chain(self, *args, **kwargs)
        finally:
            profile.session_open.append(perf_counter() - t)

    # copy of InferenceSession._send_step with timers
    async def _send_step(self: Any, span: Any, hidden: Any, beam_idx: Any, prompts: Any) -> Any:
        t0 = perf_counter()
        message: dict[str, Any] = {"type": "step", "hidden": encode_tensor(hidden, self.compression),
                                   "position": self.position, "compression": self.compression.value}
        if beam_idx is not None:
            message["beam_idx"] = encode_tensor(beam_idx.to(inference_module.torch.int64))
        if prompts is not None:
            message["prompts"] = encode_tensor(prompts, self.compression)
        payload = pack(message)
        t1 = perf_counter()
        try:
            with trio.fail_after(self.step_timeout):
                await span.stream.send(payload)
                t2 = perf_counter()
                raw = await span.stream.recv()
                t3 = perf_counter()
                reply = unpack(raw, "output")
        except trio.TooSlowError:
            raise inference_module.PeerUnavailableError(
                f"server {span.route.peer_id} did not answer within {self.step_timeout:g} s")
        out = decode_tensor(message_field(reply, "hidden", dict)).to(hidden.dtype)
        t4 = perf_counter()
        profile.add("send_step", {"seq": int(hidden.shape[1]), "encode": t1 - t0, "send": t2 - t1,
                                  "wait": t3 - t2, "decode": t4 - t3, "total": t4 - t0, "wall": time.time()},
                    key=span.route.start)
        return out

    DistributedModelForCausalLM.forward = forward
    InferenceSession.step = step
    InferenceSession.astep = astep
    InferenceSession._open_chain = _open_chain
    InferenceSession._send_step = _send_step

    local_forward = local_model.forward

    def timed_local_forward(input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        t = perf_counter()
        try:
            return local_forward(input_ids, *args, **kwargs)
        finally:
            seq = int(input_ids.shape[1]) if input_ids is not None else -1
            profile.add("local_forward", {"seq": seq, "total": perf_counter() - t})

    local_model.forward = timed_local_forward
    return stale


# ---------------------------------------------------------------------------------------------------------
# server (runs inside `jupyter-swarm serve`, see server_hook/sitecustomize.py)
# ---------------------------------------------------------------------------------------------------------
def install_server_hooks(out_path: str) -> None:
    """Instrument SpanService in this process; write the records to ``out_path`` at exit."""
    import trio

    from jupyter_swarm.errors import ProtocolError, RemoteError, SwarmError
    from jupyter_swarm.runtime import service as service_module
    from jupyter_swarm.runtime.service import SpanService
    from jupyter_swarm.wire.messages import error_message, unpack

    stale = check_copies({"jupyter_swarm.runtime.service.SpanService._serve_session": SpanService._serve_session,
                          "jupyter_swarm.runtime.service.SpanService._run": SpanService._run})
    records: list[dict[str, float]] = []
    current: dict[str, float] = {}

    async def _run(self: Any, fn: Any, *args: Any) -> Any:
        box: dict[str, float] = {}

        def timed(*a: Any) -> Any:
            box["start"] = perf_counter()
            try:
                return fn(*a)
            finally:
                box["end"] = perf_counter()

        t0 = perf_counter()
        result = await trio.to_thread.run_sync(timed, *args, limiter=self._compute)
        t3 = perf_counter()
        current.update(hop_in=box["start"] - t0, compute=box["end"] - box["start"], hop_out=t3 - box["end"])
        return result

    # copy of SpanService._serve_session with timers
    async def _serve_session(self: Any, stream: Any, cache: Any, batch_size: int) -> None:
        while True:
            with trio.move_on_after(self.session_timeout) as idle:
                try:
                    payload = await stream.recv()
                except SwarmError:
                    return
            if idle.cancelled_caught:
                await stream.send(error_message(f"session closed after {self.session_timeout:g} s idle"))
                return
            t0 = perf_counter()
            current.clear()
            seq = -1
            try:
                message = unpack(payload, "step")
                try:
                    seq = int(message["hidden"]["shape"][1])
                except Exception:  # noqa: BLE001 - only for the record
                    pass
                reply = await self._step(message, cache, batch_size)
            except SwarmError as e:
                self.stats.errors += 1
                reply = error_message(str(e), invalid_request=isinstance(e, (ProtocolError, RemoteError)))
            except Exception as e:
                service_module.logger.exception("inference step failed")
                self.stats.errors += 1
                reply = error_message(f"server error: {e!r}")
            t1 = perf_counter()
            await stream.send(reply)
            t2 = perf_counter()
            records.append({"wall": time.time(), "start": self.span.start, "end": self.span.end, "seq": seq,
                            "handle": t2 - t0, "step": t1 - t0, "send": t2 - t1, **current})

    SpanService._run = _run
    SpanService._serve_session = _serve_session

    def dump() -> None:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "stale_copies": stale, "records": records}, f)

    atexit.register(dump)


# ---------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------
def med_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def mean_ms(values: list[float]) -> float:
    return 1000 * statistics.fmean(values) if values else float("nan")
