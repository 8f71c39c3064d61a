"""The kernel-side swarm runtime: one per kernel, behind the magics, widgets and the JupyterLab panel.

Everything slow runs in background threads: joining a swarm, loading weights, serving blocks, generating.
The runtime publishes a JSON snapshot of what it knows (see :mod:`jupyter_swarm.notebook.state`) for the
Jupyter server extension, and shuts down served blocks, the client and any local swarm when the kernel exits.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_swarm.notebook import state as state_files

logger = logging.getLogger(__name__)


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


@dataclass
class GenerationResult:
    """What one generation produced and how fast."""

    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    token_times: list[float] = field(default_factory=list)
    route: list[tuple[str, int, int]] = field(default_factory=list)  # (peer id, start, end)
    stopped: bool = False
    error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        gaps = self.gaps()
        return len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else 0.0

    @property
    def seconds_per_token(self) -> float:
        gaps = self.gaps()
        return sum(gaps) / len(gaps) if gaps else 0.0

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class SwarmRuntime:
    """The swarm as this kernel sees it: a client model, optionally a local swarm and a served span."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_path: str | None = None
        self.initial_peers: list[str] = []
        self.swarm_key: Any = None  # the SwarmKey of a private swarm (None: open)
        self.local_swarm: Any = None
        self.last_map: Any = None
        self.last_map_time = 0.0
        self.last_result: GenerationResult | None = None
        self.generating = False
        self._stop_generation = threading.Event()
        self._generate_lock = threading.Lock()
        self._map_lock = threading.Lock()
        # serving
        self.server: Any = None
        self.serve_state = "idle"  # idle | starting | serving | stopping | error
        self.serve_error: str | None = None
        self.serve_blocks: tuple[int, int] | None = None
        self.serve_device = "cpu"
        self.serve_started_at: float | None = None
        self._serve_thread: threading.Thread | None = None
        # publishing
        self._publisher: threading.Thread | None = None
        self._closed = threading.Event()
        atexit.register(self.shutdown)

    # ---- connecting ---------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.model is not None

    def connect(self, model: str, peers: Sequence[str] = (), *, local: bool = False,
                spans: Sequence[tuple[int, int]] | None = None, progress: Callable[[str], None] = print,
                swarm_key: str | None = None) -> Any:
        """Join a swarm (or start a local one with ``local``) and load the client's parts of ``model``.

        ``swarm_key``: the key file of a private swarm (default: ``$JUPYTER_SWARM_KEY``, else an open swarm); a
        local swarm's servers and this kernel's served blocks use it too."""
        from transformers import AutoTokenizer

        from jupyter_swarm.client.model import AutoDistributedModelForCausalLM
        from jupyter_swarm.errors import ConfigurationError
        from jupyter_swarm.p2p.swarm_key import resolve_swarm_key

        if self.connected:
            self.disconnect()
        key = resolve_swarm_key(swarm_key)
        from jupyter_swarm.demo import DEMO_NAMES, demo_model_path

        if model in DEMO_NAMES:
            progress(f"{model} model: {DEMO_NAMES[model]}")
        path = demo_model_path(model) or model
        if local:
            from jupyter_swarm.local_swarm import LocalSwarm, default_spans
            from jupyter_swarm.models import load_model_config
            from jupyter_swarm.runtime.server import num_blocks_of

            total = num_blocks_of(load_model_config(path))
            spans = list(spans) if spans else default_spans(total)
            for start, end in spans:
                if not 0 <= start < end <= total:
                    raise ConfigurationError(f"span {start}:{end} is outside the model's {total} blocks")
            progress(f"starting a local swarm: {len(spans)} server(s) for blocks "
                     + ", ".join(f"{a}:{b}" for a, b in spans) + " (loopback only)...")
            # own session: a kernel interrupt (SIGINT to the kernel's process group) must not stop the servers
            self.local_swarm = LocalSwarm(path, spans, extra_args=["--update-period", "5", "--torch-threads", "1"],
                                          new_session=True, swarm_key=swarm_key)
            peers = self.local_swarm.initial_peers
        if not peers:
            raise ConfigurationError("give the swarm's addresses with --peers /ip4/.../p2p/... "
                                     "(or use --local to start a swarm on this machine)")
        progress("joining the swarm and loading the model's embeddings and head...")
        try:
            self.model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=list(peers), swarm_key=key)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except BaseException:
            self.disconnect()
            raise
        self.model_path, self.initial_peers, self.swarm_key = path, list(peers), key
        self._start_publisher()
        return self.model

    def disconnect(self) -> None:
        """Leave the swarm: stop serving, close the client, stop the local swarm."""
        self.stop_generation()
        self.stop_serving(wait=True)
        model, self.model = self.model, None
        if model is not None:
            try:
                model.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing the client failed")
        swarm, self.local_swarm = self.local_swarm, None
        if swarm is not None:
            swarm.stop()
        self.last_map = None
        self.tokenizer = None

    def require_model(self) -> Any:
        from jupyter_swarm.errors import ConfigurationError

        if self.model is None:
            raise ConfigurationError("not connected: run `%swarm connect MODEL --peers ...` "
                                     "(or `%swarm connect demo --local`) first")
        return self.model

    # ---- the swarm map -------------------------------------------------------------------------------------
    def read_map(self, max_age: float = 0.0) -> Any:
        """The connected model's swarm map (cached for ``max_age`` seconds)."""
        model = self.require_model()
        with self._map_lock:
            if self.last_map is None or time.monotonic() - self.last_map_time > max_age:
                self.last_map = model.swarm.read_map()
                self.last_map_time = time.monotonic()
            return self.last_map

    def next_route(self) -> list[tuple[str, int, int]]:
        """The chain of servers the next request would take: (peer id, start, end) per span."""
        from jupyter_swarm.client.routing import choose_chain

        model = self.require_model()
        swarm_map = self.read_map()
        chain = choose_chain(swarm_map, 0, swarm_map.num_blocks, banned=model.swarm.bans.banned(),
                             pings=self.client_pings())
        return [(r.peer_id, r.start, r.end) for r in chain]

    def client_pings(self) -> dict[str, float]:
        """The client's own smoothed round-trip times to servers (seconds), as its routing measured them."""
        pings = getattr(self.model.swarm, "pings", None) if self.model is not None else None
        try:
            return dict(pings.to_dict()) if pings is not None else {}
        except Exception:  # noqa: BLE001 - measurements are optional decoration
            return {}

    # ---- generating ----------------------------------------------------------------------------------------
    def generate_stream(self, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                        top_p: float = 1.0, num_beams: int = 1, chat: bool | None = None,
                        system_prompt: str | None = None) -> Iterator[str | GenerationResult]:
        """Generate in a background thread; yields text pieces as they arrive and finally the result.

        ``chat``: send ``prompt`` as a user message through the tokenizer's chat template, after
        ``system_prompt`` (default: a helpful assistant); None (the default) means "when the model has a chat
        template". False sends ``prompt`` as it is, to be continued.

        :meth:`stop_generation` (or closing the iterator, e.g. on KeyboardInterrupt) ends the request cleanly.
        """
        pieces: queue.Queue[Any] = queue.Queue()
        thread = self.start_generation(prompt, on_text=pieces.put, on_done=pieces.put, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, num_beams=num_beams, chat=chat,
                                       system_prompt=system_prompt)
        try:
            while True:
                item = pieces.get()
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            if thread.is_alive():
                self.stop_generation()
                thread.join()

    def start_generation(self, prompt: str, *, on_text: Callable[[str], None],
                         on_done: Callable[[GenerationResult], None], max_new_tokens: int = 32,
                         temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1, chat: bool | None = None,
                         system_prompt: str | None = None) -> threading.Thread:
        """Start generating in a background thread; ``on_text`` gets pieces, ``on_done`` the result (``chat`` and
        ``system_prompt`` as in :meth:`generate_stream`)."""
        from jupyter_swarm.errors import ConfigurationError

        model = self.require_model()
        if not self._generate_lock.acquire(blocking=False):
            raise ConfigurationError("a generation is already running: stop it first")
        self._stop_generation.clear()
        self.generating = True

        def work() -> None:
            result = GenerationResult()
            began = time.perf_counter()
            try:
                input_ids = self.encode_prompt(prompt, chat=chat, system_prompt=system_prompt)
                self._generate(model, input_ids, result, on_text, max_new_tokens, temperature, top_p, num_beams)
            except Exception as e:  # noqa: BLE001 - shown to the user by the caller
                result.error = f"{type(e).__name__}: {e}"
            finally:
                result.seconds = time.perf_counter() - began
                result.stopped = self._stop_generation.is_set()
                self.last_result = result
                self.generating = False
                self._generate_lock.release()
                on_done(result)

        thread = threading.Thread(target=work, name="jupyter-swarm-generate", daemon=True)
        thread.start()
        return thread

    def encode_prompt(self, prompt: str, *, chat: bool | None = None, system_prompt: str | None = None) -> Any:
        """Token ids of ``prompt`` (``chat`` and ``system_prompt`` as in :meth:`generate_stream`)."""
        from jupyter_swarm.client.chat import DEFAULT_SYSTEM_PROMPT, chat_input_ids, chat_messages, has_chat_template

        if chat is None:
            chat = has_chat_template(self.tokenizer)
        if not chat:
            return self.tokenizer(prompt, return_tensors="pt").input_ids
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        return chat_input_ids(self.tokenizer, chat_messages(prompt, system))

    def _generate(self, model: Any, input_ids: Any, result: GenerationResult, on_text: Callable[[str], None],
                  max_new_tokens: int, temperature: float, top_p: float, num_beams: int) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = self._stop_generation

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        def on_piece(piece: str) -> None:
            result.token_times.append(time.perf_counter())
            result.tokens += 1
            result.text += piece
            on_text(piece)

        from jupyter_swarm.client.streaming import TextPieceStreamer

        sampling = temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=num_beams,
                                      stopping_criteria=StoppingCriteriaList([_Stop()]),
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        if num_beams == 1:
            kwargs["streamer"] = TextPieceStreamer(self.tokenizer, on_piece)
        with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
            output = model.generate(input_ids, **kwargs)
            result.route = [(r.peer_id, r.start, r.end) for r in session.routes]
        if num_beams > 1:  # beams finish together: show the winner at once
            text = self.tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)
            result.token_times.append(time.perf_counter())
            result.tokens = int(output.shape[1] - input_ids.shape[1])
            result.text = text
            on_text(text)

    def stop_generation(self) -> None:
        """End the current generation after its current step (the session closes cleanly)."""
        self._stop_generation.set()

    # ---- serving ---------------------------------------------------------------------------------------------
    def serve(self, blocks: str = "auto", *, device: str | None = None, dtype: str | None = None,
              model: str | None = None) -> threading.Thread:
        """Serve blocks of the connected model from this kernel, in a background thread."""
        from jupyter_swarm.errors import ConfigurationError

        if self.serve_state in ("starting", "serving", "stopping"):
            raise ConfigurationError(f"already {self.serve_state}: run `%swarm stop` first")
        model_path = model or self.model_path
        if model_path is None:
            raise ConfigurationError("nothing to serve: connect to a swarm first (`%swarm connect MODEL ...`)")
        device = device or ("cuda" if gpu_available() else "cpu")
        self.serve_state, self.serve_error, self.serve_blocks, self.serve_device = "starting", None, None, device
        self.serve_started_at = time.time()
        thread = threading.Thread(target=self._serve, args=(model_path, blocks, device, dtype),
                                  name="jupyter-swarm-serve", daemon=True)
        self._serve_thread = thread
        thread.start()
        self._start_publisher()
        return thread

    def _serve(self, model_path: str, blocks: str, device: str, dtype: str | None) -> None:
        try:
            import torch

            from jupyter_swarm.errors import ConfigurationError
            from jupyter_swarm.models import load_model_config
            from jupyter_swarm.runtime.server import BlockServer, ServerConfig, num_blocks_of, parse_blocks

            if dtype not in (None, "auto", "float32", "float16", "bfloat16"):
                raise ConfigurationError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
            if device.startswith("cuda") and not gpu_available():
                raise ConfigurationError("no GPU is visible to this kernel: use --device cpu")
            total = num_blocks_of(load_model_config(model_path))
            # "auto": the runtime's own placement (blocks where the swarm's throughput is lowest, as many as the
            # device's memory holds) and its periodic rebalancing
            start, end = (None, None) if blocks == "auto" else parse_blocks(blocks, total)
            server = BlockServer(ServerConfig(
                model_path, start, end, initial_peers=list(self.initial_peers), device=device, update_period=5.0,
                dtype=None if dtype in (None, "auto") else getattr(torch, dtype), swarm_key=self.swarm_key))
            self.server = server
            server.start()
            self.serve_blocks = (server.start_block, server.end_block)
            if self.serve_state == "stopping":
                return
            self.serve_state = "serving"
            self.last_map_time = 0.0  # the next read shows this server
        except BaseException as e:  # noqa: BLE001 - shown in the serve panel and by the magics
            self.server = None
            self.serve_state = "error"
            self.serve_error = _describe_error(e)

    def wait_serving(self, timeout: float = 300.0) -> str:
        """Wait (at most ``timeout`` s) until serving has started or failed; returns the serve state."""
        thread = self._serve_thread
        if thread is not None:
            thread.join(timeout)
        return self.serve_state

    def stop_serving(self, wait: bool = True) -> None:
        """Stop the served span (announces it offline, closes its host)."""
        if self.serve_state not in ("starting", "serving"):
            if self.serve_state == "error":
                self.serve_state, self.serve_error = "idle", None
            return
        self.serve_state = "stopping"
        thread = self._serve_thread
        if thread is not None and thread.is_alive():
            thread.join(120)  # a span that is still loading finishes loading first
        server, self.server = self.server, None
        if server is not None:
            try:
                server.stop()
            except Exception:  # noqa: BLE001
                logger.exception("stopping the server failed")
        self.serve_state = "idle"
        self.serve_blocks = None

    def serve_progress(self) -> tuple[int, str]:
        """(step of 4, what it is doing) while starting to serve."""
        server = self.server
        if self.serve_state == "serving":
            return 4, "serving"
        if server is None or getattr(server, "node", None) is None:
            return 0, "joining the swarm"
        if getattr(server, "start_block", None) is None:
            return 1, "choosing blocks"
        if getattr(server, "span", None) is None:
            return 2, "loading weights"
        return 3, "measuring throughput"

    def serve_stats(self) -> dict[str, Any]:
        """Blocks, requests, throughput, cache and memory of the span this kernel serves."""
        stats: dict[str, Any] = {"state": self.serve_state, "error": self.serve_error, "device": self.serve_device,
                                 "blocks": list(self.serve_blocks) if self.serve_blocks else None}
        server = self.server
        if server is not None and getattr(server, "start_block", None) is not None:  # chosen, or moved since
            self.serve_blocks = (server.start_block, server.end_block)
            stats["blocks"] = list(self.serve_blocks)
        step, doing = self.serve_progress()
        stats.update(progress_step=step, progress_steps=4, progress=doing)
        server = self.server
        service = getattr(server, "service", None)
        if server is not None and self.serve_state == "serving":
            stats["peer_id"] = server.peer_id if server.node else None
            stats["throughput"] = float(getattr(server, "_throughput", 0.0))
        if service is not None:
            s = service.stats
            stats.update(inference_steps=s.inference_steps, forward_requests=s.forward_requests,
                         backward_requests=s.backward_requests, sessions_opened=s.sessions_opened,
                         open_sessions=s.open_sessions, errors=s.errors,
                         requests=s.inference_steps + s.forward_requests + s.backward_requests,
                         cache_used_bytes=service.budget.used_bytes, cache_total_bytes=service.budget.total_bytes)
        span = getattr(server, "span", None)
        if span is not None:
            stats["weights_bytes"] = sum(p.numel() * p.element_size() for p in span.parameters())
        stats["process_memory_bytes"] = _rss_bytes()
        if self.serve_device.startswith("cuda") and gpu_available():
            import torch

            stats["gpu_memory_bytes"] = int(torch.cuda.memory_allocated())
        return stats

    # ---- the snapshot the Jupyter server reads ---------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-able picture of the swarm as this kernel knows it."""
        data: dict[str, Any] = {"kernel_id": _kernel_id(), "connected": self.connected, "model": self.model_path,
                                "initial_peers": self.initial_peers, "local_swarm": self.local_swarm is not None,
                                "serve": self.serve_stats(), "gpu": gpu_available(), "generating": self.generating}
        swarm_map = self.last_map
        if swarm_map is not None:
            data.update(map_snapshot(swarm_map))
        own = self.server.peer_id if self.server is not None and self.server.node is not None else None
        data["own_peer_id"] = own
        if self.last_result is not None:
            r = self.last_result
            data["last_generation"] = {"tokens": r.tokens, "tokens_per_second": r.tokens_per_second,
                                       "route": [list(x) for x in r.route], "error": r.error}
        return data

    def _start_publisher(self) -> None:
        if self._publisher is not None and self._publisher.is_alive():
            return
        self._publisher = threading.Thread(target=self._publish_loop, name="jupyter-swarm-publish", daemon=True)
        self._publisher.start()

    def _publish_loop(self) -> None:
        while not self._closed.wait(1.0):
            if not self.connected and self.serve_state == "idle":
                state_files.remove_state()
                continue
            try:
                if self.connected:
                    self.read_map(max_age=1.5)
            except Exception:  # noqa: BLE001 - the next refresh tries again
                logger.debug("reading the swarm map failed", exc_info=True)
            try:
                self._handle_request(state_files.take_request())
                state_files.write_state(self.snapshot())
            except Exception:  # noqa: BLE001
                logger.debug("publishing the swarm state failed", exc_info=True)

    def _handle_request(self, request: dict[str, Any] | None) -> None:
        if not request:
            return
        action = request.get("action")
        if action == "serve":
            try:
                self.serve(str(request.get("params", {}).get("blocks", "auto")))
            except Exception as e:  # noqa: BLE001
                self.serve_state, self.serve_error = "error", _describe_error(e)
        elif action == "stop":
            threading.Thread(target=self.stop_serving, daemon=True).start()

    def shutdown(self) -> None:
        """Stop everything this runtime started (called at kernel exit)."""
        self._closed.set()
        try:
            self.disconnect()
        finally:
            self.stop_serving(wait=True)
            state_files.remove_state()


def map_snapshot(swarm_map: Any) -> dict[str, Any]:
    """A swarm map as JSON: blocks, coverage, missing blocks and servers."""
    return {
        "model_prefix": swarm_map.model_prefix,
        "num_blocks": swarm_map.num_blocks,
        "coverage": swarm_map.coverage(),
        "missing_blocks": swarm_map.missing_blocks(),
        "servers": [
            {"peer_id": r.peer_id, "start": r.start, "end": r.end, "state": r.state.value,
             "throughput": r.throughput, "cache_tokens_left": r.cache_tokens_left,
             "ttl_left": swarm_map.ttl_left.get(r.peer_id, 0.0)}
            for r in sorted(swarm_map.servers.values(), key=lambda r: (r.start, r.end, r.peer_id))
        ],
    }


def _kernel_id() -> str | None:
    """This kernel's id (from its connection file name), so the Jupyter server can tell kernels apart."""
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
    except Exception:  # noqa: BLE001 - not in a kernel
        return None
    return name.removeprefix("kernel-")


def _describe_error(e: BaseException) -> str:
    from jupyter_swarm.errors import SwarmError

    if isinstance(e, SwarmError):
        return str(e)
    text = str(e)
    if "out of memory" in text.lower():
        return f"not enough device memory to serve these blocks ({text.splitlines()[0]}); try fewer blocks"
    if isinstance(e, OSError):
        return f"model not found or unreadable: {text}"
    return f"{type(e).__name__}: {text}"


_runtime: SwarmRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> SwarmRuntime:
    """This kernel's runtime (created on first use)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = SwarmRuntime()
        return _runtime
