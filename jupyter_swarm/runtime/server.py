"""A block server: loads a span of blocks, serves it over libp2p and keeps its record in the swarm fresh."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

import jupyter_swarm
from jupyter_swarm.dht.naming import model_prefix as default_model_prefix
from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.dht.swarm_map import announce
from jupyter_swarm.errors import ConfigurationError, PeerUnavailableError
from jupyter_swarm.models import BlockSpan, load_model_config
from jupyter_swarm.p2p.host import DEFAULT_LISTEN, P2PNode
from jupyter_swarm.p2p.identity import load_or_create_identity, new_identity
from jupyter_swarm.runtime.service import SpanService
from jupyter_swarm.wire.protocols import INFERENCE, RPC

logger = logging.getLogger(__name__)


def num_blocks_of(config: Any) -> int:
    """Number of transformer blocks of a model config (Llama-style or BLOOM-style names)."""
    for name in ("num_hidden_layers", "n_layer"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigurationError(f"cannot tell how many blocks model type {config.model_type!r} has")


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int]:
    """Parse ``A:B`` (blocks A..B-1) and check it lies inside the model."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ConfigurationError(f"--blocks must look like START:END (e.g. 0:4), got {text!r}") from None
    if not 0 <= start < end <= num_blocks:
        raise ConfigurationError(
            f"--blocks {text} is outside the model: it has {num_blocks} blocks, so use 0 <= START < END <= {num_blocks}")
    return start, end


@dataclass
class ServerConfig:
    """Everything a block server needs; the CLI and the notebook build one of these."""

    model: str
    start: int
    end: int
    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_LISTEN))
    announce_addrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    dtype: torch.dtype | None = None
    device: str = "cpu"
    cache_bytes: int = 512 * 2**20
    max_session_length: int = 8192
    session_timeout: float = 30 * 60
    update_period: float = 30.0
    model_prefix: str | None = None
    throughput: float | None = None


class BlockServer:
    """Serves blocks [start, end) of a model to the swarm until :meth:`stop`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.prefix = config.model_prefix or default_model_prefix(config.model)
        self.state = ServerState.JOINING
        self.node: P2PNode | None = None
        self.store: RecordStore | None = None
        self.service: SpanService | None = None
        self.span: BlockSpan | None = None
        self._stop = threading.Event()
        self._throughput = config.throughput or 1.0

    @property
    def peer_id(self) -> str:
        assert self.node is not None
        return self.node.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.node.addrs if self.node else []

    def start(self) -> "BlockServer":
        """Join the swarm (announcing 'joining'), load the span, then announce 'online'. Returns when online."""
        cfg = self.config
        model_config = load_model_config(cfg.model)
        total = self.num_blocks = num_blocks_of(model_config)
        if not 0 <= cfg.start < cfg.end <= total:
            raise ConfigurationError(
                f"blocks {cfg.start}:{cfg.end} are outside the model: it has {total} blocks (0:{total})")
        identity = load_or_create_identity(cfg.identity_path) if cfg.identity_path else new_identity()
        self.node = P2PNode(identity=identity, listen=cfg.listen, announce=cfg.announce_addrs).start()
        try:
            self.store = RecordStore(self.node)
            self._join(cfg.initial_peers)
            self.node.spawn_from_thread(self._announce_loop)
            self.span = BlockSpan.load(cfg.model, cfg.start, cfg.end, dtype=cfg.dtype, device=cfg.device)
            self.service = SpanService(self.span, cache_bytes=cfg.cache_bytes,
                                       max_session_length=cfg.max_session_length,
                                       session_timeout=cfg.session_timeout)
            if cfg.throughput is None:
                self._throughput = self._measure_throughput()
            self.node.set_handler(RPC, self.service.handle_rpc)
            self.node.set_handler(INFERENCE, self.service.handle_inference)
            self.state = ServerState.ONLINE
            self.node.call(self._announce_once)
        except BaseException:
            self.node.shutdown()
            raise
        logger.info("serving blocks %d:%d of %s as %s", cfg.start, cfg.end, self.prefix, self.addrs)
        return self

    def _join(self, initial_peers: list[str]) -> None:
        assert self.node is not None
        if not initial_peers:
            return
        errors = []
        for address in initial_peers:
            try:
                self.node.call(self.node.connect, address)
            except PeerUnavailableError as e:
                errors.append(str(e))
        if len(errors) == len(initial_peers):
            raise PeerUnavailableError("none of the initial peers answered: " + "; ".join(errors))

        async def refresh() -> None:
            with trio.move_on_after(5):
                await self.node.dht.refresh_routing_table()  # type: ignore[union-attr]

        self.node.call(refresh)

    def _measure_throughput(self) -> float:
        """Inference steps per second through one block (batch 1, one token), a quick in-place estimate."""
        assert self.span is not None
        hidden = torch.zeros(1, 1, self.span.hidden_size, dtype=self.span.dtype, device=self.span.device)
        with torch.inference_mode():
            cache = self.span.new_cache(1, 8)
            self.span(hidden, cache=cache)
            began = time.perf_counter()
            for _ in range(4):
                self.span(hidden, cache=cache)
            per_step = (time.perf_counter() - began) / 4
        return self.span.num_blocks / max(per_step, 1e-6)

    def record(self) -> ServerRecord:
        """This server's current announcement."""
        assert self.node is not None
        cfg = self.config
        return ServerRecord(
            peer_id=self.node.peer_id, addrs=self.node.addrs, start=cfg.start, end=cfg.end, state=self.state,
            throughput=self._throughput, inference_rps=self._throughput, forward_rps=self._throughput,
            cache_tokens_left=self.service.cache_tokens_left() if self.service else 0,
            dtype=str(self.span.dtype if self.span else cfg.dtype or "float32").removeprefix("torch."),
            version=jupyter_swarm.__version__)

    async def _announce_once(self, ttl: float | None = None) -> None:
        assert self.store is not None
        await announce(self.store, self.prefix, self.num_blocks, self.record(), ttl or 2 * self.config.update_period)

    async def _announce_loop(self) -> None:
        period = self.config.update_period
        while True:
            began = trio.current_time()
            # A replica that went silent must not delay the next refresh past our records' expiry.
            with trio.move_on_after(period):
                try:
                    await self._announce_once()
                except Exception:  # noqa: BLE001 - a failed refresh is retried next period
                    logger.exception("could not refresh this server's records")
            await trio.sleep_until(began + period)

    def run_forever(self) -> None:
        """Block until :meth:`stop` is called (e.g. from a signal handler)."""
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Announce 'offline', close every session and the host. Idempotent."""
        self._stop.set()
        node, self.node = self.node, None
        if node is None:
            return
        self.state = ServerState.OFFLINE
        self.node = node
        try:
            node.call(self._announce_once, 2.0)
        except Exception:  # noqa: BLE001 - best effort: the records expire anyway
            pass
        self.node = None
        node.shutdown()
