"""Serving blocks from a kernel: a block server in a background thread, its progress and its stats."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_swarm.notebook.connection import SwarmConnection
from jupyter_swarm.options import QUANT_TYPES

logger = logging.getLogger(__name__)

DTYPES = (None, "auto", "float32", "float16", "bfloat16")


def gpu_available() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


class KernelServing:
    """Blocks this kernel serves to the swarm it is connected to.

    ``state`` is ``idle``, ``starting``, ``serving``, ``stopping`` or ``error`` (then ``error`` says why).
    """

    def __init__(self, connection: SwarmConnection):
        self.connection = connection
        self.server: Any = None  # the BlockServer; read only through its status()
        self.state = "idle"
        self.error: str | None = None
        self.blocks: tuple[int, int] | None = None
        self.device = "cpu"
        self.quant_type = "auto"  # as asked; the server's status says what auto became
        self.started_at: float | None = None
        self._thread: threading.Thread | None = None

    def serve(self, blocks: str = "auto", *, device: str | None = None, dtype: str | None = None,
              quant_type: str = "auto", model: str | None = None) -> threading.Thread:
        """Serve ``blocks`` (``auto`` or ``A:B``) of the connected model (or ``model``) in a background thread.

        ``quant_type``: ``none``, ``int8``, ``nf4``, ``fp4``, or ``auto`` (nf4 on a GPU that cannot hold the blocks in
        float, none otherwise).
        """
        from jupyter_swarm.errors import ConfigurationError

        if self.state in ("starting", "serving", "stopping"):
            raise ConfigurationError(f"already {self.state}: run `%swarm stop` first")
        if quant_type not in QUANT_TYPES:
            raise ConfigurationError(f"unknown quant type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
        model_path = model or self.connection.model_path
        if model_path is None:
            raise ConfigurationError("nothing to serve: connect to a swarm first (`%swarm connect MODEL ...`)")
        device = device or ("cuda" if gpu_available() else "cpu")
        self.state, self.error, self.blocks, self.device = "starting", None, None, device
        self.quant_type = quant_type
        self.started_at = time.time()
        thread = threading.Thread(target=self._serve, args=(model_path, blocks, device, dtype, quant_type),
                                  name="jupyter-swarm-serve", daemon=True)
        self._thread = thread
        thread.start()
        return thread

    def _serve(self, model_path: str, blocks: str, device: str, dtype: str | None, quant_type: str) -> None:
        try:
            import torch

            from jupyter_swarm.errors import ConfigurationError
            from jupyter_swarm.models import load_model_config
            from jupyter_swarm.runtime.server import BlockServer, ServerConfig, num_blocks_of, parse_blocks

            if dtype not in DTYPES:
                raise ConfigurationError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
            if device.startswith("cuda") and not gpu_available():
                raise ConfigurationError("no GPU is visible to this kernel: use --device cpu")
            total = num_blocks_of(load_model_config(model_path))
            # "auto": the server's own placement (blocks where the swarm's throughput is lowest, as many as the
            # device's memory holds) and its periodic rebalancing
            start, end = (None, None) if blocks == "auto" else parse_blocks(blocks, total)
            server = BlockServer(ServerConfig(
                model_path, start, end, initial_peers=list(self.connection.initial_peers), device=device,
                update_period=5.0, dtype=None if dtype in (None, "auto") else getattr(torch, dtype),
                quant_type=quant_type, swarm_key=self.connection.swarm_key))
            self.server = server
            server.start()
            status = server.status()
            self.blocks = (status.start_block, status.end_block)
            if self.state == "stopping":
                return
            self.state = "serving"
            self.connection.forget_map()  # the next read shows this server
        except BaseException as e:  # noqa: BLE001 - shown in the serve panel and by the magics
            self.server = None
            self.state = "error"
            self.error = describe_error(e)

    def wait_serving(self, timeout: float = 300.0) -> str:
        """Wait (at most ``timeout`` s) until serving has started or failed; returns the serve state."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.state

    def stop_serving(self, wait: bool = True) -> None:
        """Stop the served span (announces it offline, closes its host)."""
        if self.state not in ("starting", "serving"):
            if self.state == "error":
                self.state, self.error = "idle", None
            return
        self.state = "stopping"
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(120)  # a span that is still loading finishes loading first
        server, self.server = self.server, None
        if server is not None:
            try:
                server.stop()
            except Exception:  # noqa: BLE001
                logger.exception("stopping the server failed")
        self.state = "idle"
        self.blocks = None

    def own_peer_id(self) -> str | None:
        """The peer id this kernel serves as (None when it serves nothing)."""
        server = self.server
        return server.status().peer_id if server is not None else None

    def stats(self) -> dict[str, Any]:
        """State, progress (step of 4), blocks, requests, throughput, cache and memory of the served span."""
        from jupyter_swarm.runtime.server_status import STARTING_STAGES

        stats: dict[str, Any] = {"state": self.state, "error": self.error, "device": self.device,
                                 "quant_type": self.quant_type,
                                 "blocks": list(self.blocks) if self.blocks else None,
                                 "progress_steps": len(STARTING_STAGES)}
        server = self.server
        if server is None:
            stats.update(progress_step=len(STARTING_STAGES) if self.state == "serving" else 0,
                         progress="serving" if self.state == "serving" else STARTING_STAGES[0])
        else:
            status = server.status()
            if status.start_block is not None:  # chosen, or moved since
                self.blocks = (status.start_block, status.end_block)
                stats["blocks"] = list(self.blocks)
            stats.update({key: value for key, value in status.to_dict().items()
                          if key not in ("stage", "step", "start_block", "end_block", "addrs")})
            stats.update(progress_step=status.step, progress=status.stage)
        stats["process_memory_bytes"] = _rss_bytes()
        if self.device.startswith("cuda") and gpu_available():
            import torch

            stats["gpu_memory_bytes"] = int(torch.cuda.memory_allocated())
        return stats


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def describe_error(e: BaseException) -> str:
    """A message for the serve panel: a SwarmError's own message, or the exception with a hint."""
    from jupyter_swarm.errors import SwarmError

    if isinstance(e, SwarmError):
        return str(e)
    text = str(e)
    if "out of memory" in text.lower():
        return f"not enough device memory to serve these blocks ({text.splitlines()[0]}); try fewer blocks"
    if isinstance(e, OSError):
        return f"model not found or unreadable: {text}"
    return f"{type(e).__name__}: {text}"
