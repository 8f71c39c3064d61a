"""A block server: loads a span of blocks, serves it over libp2p and keeps its record in the swarm fresh."""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

import jupyter_swarm
from jupyter_swarm.dht.naming import model_prefix as default_model_prefix
from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.dht.swarm_map import SwarmMap, announce, read_swarm
from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import BlockSpan, load_model_config
from jupyter_swarm.models.config import config_dtype
from jupyter_swarm.models.family import get_family
from jupyter_swarm.models.quantization import (QuantType, check_device, check_device_runs, measured_bytes,
                                               parse_quant_type, weight_bytes)
from jupyter_swarm.p2p.addresses import default_listen
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.peer_limits import PeerByteRate
from jupyter_swarm.p2p.identity import load_or_create_identity, new_identity
from jupyter_swarm.p2p.reachability import NetworkOptions
from jupyter_swarm.p2p.swarm_key import SwarmKey, resolve_swarm_key
from jupyter_swarm.runtime.adapters import ServedAdapters
from jupyter_swarm.runtime.limits import ServerLimits
from jupyter_swarm.runtime.block_selection import BALANCE_QUALITY, choose_span, should_move, span_length_for_memory
from jupyter_swarm.runtime.server_status import (SERVED_COUNTERS, SERVING, STARTING_STAGES, STOPPED, ServerStatus,
                                                 stage_step)
from jupyter_swarm.p2p.pings import PingAggregator, ping_many
from jupyter_swarm.runtime.service import SpanService
from jupyter_swarm.runtime.bandwidth import measure_bandwidth_to_any, serve_speedtest
from jupyter_swarm.runtime.throughput import ThroughputInfo, get_throughput
from jupyter_swarm.wire.protocols import (INFERENCE, INFERENCE_STREAMS, PUSH, PUSH_STREAMS, RPC, RPC_STREAMS, SPEEDTEST,
                                          SPEEDTEST_STREAMS)

logger = logging.getLogger(__name__)

GOODBYE_TIMEOUT = 2.0
SETTLE_TIMEOUT = 8.0  # seconds a server waits to know its reachability (and hold relay slots) before announcing


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


def parse_blocks_option(text: str | None, num_blocks: int, serve_blocks: int | None = None) -> tuple[int, int] | None:
    """``--blocks``: None or ``auto`` -> None (automatic placement); ``A:B`` -> (A, B), checked against the model."""
    if serve_blocks is not None and not 0 < serve_blocks <= num_blocks:
        raise ConfigurationError(f"--num-blocks {serve_blocks} is outside the model: use 1..{num_blocks}")
    if text is None or text.strip().lower() == "auto":
        return None
    if serve_blocks is not None:
        raise ConfigurationError(f"--blocks {text} and --num-blocks {serve_blocks} contradict each other: give a "
                                 "span (--blocks A:B), or a size for automatic placement (--num-blocks N), not both")
    return parse_blocks(text, num_blocks)


def block_bytes(model_config: Any, dtype: torch.dtype, quant_type: QuantType = QuantType.NONE) -> int:
    """Memory the weights of one block take once loaded (quantized, if ``quant_type`` says so), in bytes.

    The block is built on the meta device: nothing is allocated.
    """
    family = get_family(model_config)
    with torch.device("meta"):
        block = family.make_block(family.span_config(model_config, 0, 1), 0)
    return weight_bytes(block, quant_type, dtype)


#: what ``auto`` tries on a GPU, least lossy first (SmolLM2's perplexity: int8 +1.7%, nf4 +30%; bench/README.md)
AUTO_QUANT_ORDER = (QuantType.NONE, QuantType.INT8, QuantType.NF4)


def choose_quant_type(requested: str, *, device: str, span_bytes: dict[QuantType, int],
                      usable_bytes: int) -> QuantType:
    """The quant type a server uses: ``requested``, unless it is ``auto``.

    ``auto`` on a CUDA device is the least lossy quant type in which the span the server wants fits its usable
    memory: ``none``, else ``int8``, else ``nf4`` (``span_bytes``: the bytes of that span in each; the span is the
    pinned one, ``--num-blocks`` blocks, or else the whole model). On other devices it is ``none``: memory is rarely
    the limit there, and float blocks decode fastest (int8 0.95x, nf4 0.89x on this project's CPU) and give a local
    model's outputs exactly. Quantizing is what lets consumer GPUs hold big models, but it costs accuracy
    (perplexity on SmolLM2: int8 +1.7%, nf4 +30%, fp4 +45%), so a GPU quantizes only as far as it must; NF4
    rather than FP4 at 4 bits, as it loses less.
    """
    if requested.strip().lower() != "auto":
        return parse_quant_type(requested)
    if torch.device(device).type != "cuda":
        return QuantType.NONE
    for quant_type in AUTO_QUANT_ORDER:
        if span_bytes[quant_type] <= usable_bytes:
            break
    if quant_type != QuantType.NONE:
        logger.info("quant type auto: %.0f MiB of float blocks do not fit in %.0f MiB usable, so %s",
                    span_bytes[QuantType.NONE] / 2**20, usable_bytes / 2**20, quant_type.value)
    return quant_type


def available_memory(device: str) -> int:
    """Free memory of ``device`` in bytes (GPU: free device memory; CPU: available system memory)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


@dataclass
class ServerConfig:
    """Everything a block server needs; the CLI and the notebook build one of these.

    ``start``/``end`` None means automatic placement: the server takes ``serve_blocks`` blocks (or as many as
    ``memory_bytes`` holds, weights plus its cache budget) where the swarm's per-block throughput is lowest,
    and re-checks its place every uniform(0, 2 x ``balance_period``) seconds.
    """

    model: str
    start: int | None = None
    end: int | None = None
    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] | None = None  # None: loopback for a local swarm, every interface otherwise
    announce_addrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    dtype: torch.dtype | None = None
    device: str = "cpu"
    quant_type: str = "auto"  # none | int8 | nf4 | fp4 | auto (see choose_quant_type)
    cache_bytes: int = 512 * 2**20
    max_session_length: int = 8192
    session_timeout: float = 30 * 60
    update_period: float = 30.0
    model_prefix: str | None = None
    throughput: float | None = None
    serve_blocks: int | None = None
    memory_bytes: int | None = None
    balance_period: float = 60.0
    balance_quality: float = BALANCE_QUALITY
    bandwidth_mbps: float | None = None
    max_pinged: int = 5
    adapters: list[str] = field(default_factory=list)  # LoRA adapters to host: PATH or NAME=PATH (runtime/adapters.py)
    swarm_key: str | SwarmKey | None = None  # a key file (or key) of a private swarm; None: $JUPYTER_SWARM_KEY or open
    allowed_peers: list[str] | None = None  # connect only with these peer ids (servers and clients); None: anyone
    progress: bool = False  # tqdm bars while loading blocks and measuring throughput (`serve` on a terminal)
    network: NetworkOptions = field(default_factory=NetworkOptions)  # relays, relay service, hole punching
    limits: ServerLimits = field(default_factory=ServerLimits)  # what one peer may use (runtime/limits.py)


class BlockServer:
    """Serves blocks [start, end) of a model to the swarm until :meth:`stop`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.prefix = config.model_prefix or default_model_prefix(config.model)
        self.state = ServerState.JOINING
        self.node: P2PNode | None = None
        self.swarm_key: SwarmKey | None = None
        self._joined_peers: list[str] = []
        self.measured_bandwidth_mbps: float | None = None
        self.store: RecordStore | None = None
        self.service: SpanService | None = None
        self.span: BlockSpan | None = None
        self.adapters: ServedAdapters | None = None
        self.start_block, self.end_block = config.start, config.end
        self.auto = config.start is None
        self.quant_type = QuantType.NONE  # resolved from config.quant_type by start()
        self.moves = 0
        self.moving_to: int | None = None
        self.pings = PingAggregator()
        self._stop = threading.Event()
        self.stage = STARTING_STAGES[0]
        self._throughput = config.throughput or 1.0
        self._rates = ThroughputInfo(self._throughput, self._throughput, float("inf"))

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
        self.prepare()
        identity = load_or_create_identity(cfg.identity_path) if cfg.identity_path else new_identity()
        self.swarm_key = resolve_swarm_key(cfg.swarm_key)
        byte_rate = PeerByteRate(cfg.limits.bytes_per_second_per_peer, cfg.limits.burst_bytes_per_peer)
        listen = cfg.listen or default_listen(cfg.initial_peers)
        self.node = P2PNode(identity=identity, listen=listen, announce=cfg.announce_addrs,
                            swarm_key=self.swarm_key, allowed_peers=cfg.allowed_peers, network=cfg.network,
                            byte_rate=byte_rate).start()
        try:
            self.store = RecordStore(self.node)
            self.node.set_handler(SPEEDTEST, serve_speedtest, SPEEDTEST_STREAMS)
            self._enter_stage(STARTING_STAGES[0], f" through {len(cfg.initial_peers)} initial peer(s)"
                              if cfg.initial_peers else " (a new swarm)")
            self._join(cfg.initial_peers)
            # Peers behind NAT learn that they are and take relay slots before announcing their addresses.
            self.node.call(self.node.reach.wait_settled, SETTLE_TIMEOUT)  # type: ignore[union-attr]
            self.node.addresses.on_change = self._addresses_changed
            self.node.call_sync(self.node.watch_links, lambda peer: self.pings.forget(peer))
            self._enter_stage(STARTING_STAGES[1], " where the swarm needs them" if self.auto else
                              f": {self.start_block}:{self.end_block}, as given")
            if self.auto:
                self.start_block, self.end_block = self.node.call(self._choose_span)
            self.node.spawn_from_thread(self._announce_loop)
            self._enter_stage(STARTING_STAGES[2], f" {self.start_block}:{self.end_block} of {cfg.model} on "
                              f"{cfg.device} (quant type {self.quant_type.value})")
            self.span = BlockSpan.load(cfg.model, self.start_block, self.end_block, dtype=cfg.dtype,
                                       device=cfg.device, quant_type=self.quant_type, progress=cfg.progress)
            self.service = self._make_service(self.span)
            self._enter_stage(STARTING_STAGES[3])
            self._set_rates(self.span)
            self.node.set_handler(RPC, self._handle_rpc, RPC_STREAMS)
            self.node.set_handler(INFERENCE, self._handle_inference, INFERENCE_STREAMS)
            self.node.set_handler(PUSH, self._handle_push, PUSH_STREAMS)
            self.state = ServerState.ONLINE
            self.stage = SERVING
            self.node.call(self._announce_once)
            self.node.spawn_from_thread(self._ping_loop)
            if self.auto and cfg.balance_period > 0:
                self.node.spawn_from_thread(self._balance_loop)
        except BaseException:
            self.node.shutdown()
            raise
        logger.info("serving blocks %d:%d of %s as %s", self.start_block, self.end_block, self.prefix, self.addrs)
        return self

    def _enter_stage(self, stage: str, detail: str = "") -> None:
        self.stage = stage
        logger.info("%s%s", stage, detail)

    def status(self) -> ServerStatus:
        """What this server is doing now: its stage, span, requests served, cache use (safe from any thread)."""
        node, span, service = self.node, self.span, self.service
        served: dict[str, int] = {} if service is None else {
            "cache_used_bytes": service.budget.used_bytes, "cache_total_bytes": service.budget.total_bytes,
            **{name: getattr(service.stats, name) for name in SERVED_COUNTERS}}
        return ServerStatus(
            stage=self.stage, step=stage_step(self.stage), peer_id=node.peer_id if node else None,
            addrs=list(node.addrs) if node else [], start_block=self.start_block, end_block=self.end_block,
            num_blocks=getattr(self, "num_blocks", None), quant_type=self.quant_type.value,
            dtype=str(span.dtype).removeprefix("torch.") if span is not None else None,
            weights_bytes=measured_bytes(span.blocks) if span is not None else 0,  # quantization scales included
            throughput=float(self._throughput), moves=self.moves, **served)

    def prepare(self) -> None:
        """Read the model's config and check the options against it, choosing the quant type (no network yet)."""
        cfg = self.config
        model_config = self.model_config = load_model_config(cfg.model)
        total = self.num_blocks = num_blocks_of(model_config)
        if (cfg.start is None) != (cfg.end is None):
            raise ConfigurationError("give both ends of the span (start and end), or neither for automatic placement")
        if cfg.start is not None and not 0 <= cfg.start < cfg.end <= total:  # type: ignore[operator]
            raise ConfigurationError(
                f"blocks {cfg.start}:{cfg.end} are outside the model: it has {total} blocks (0:{total})")
        if cfg.serve_blocks is not None and not 0 < cfg.serve_blocks <= total:
            raise ConfigurationError(f"num_blocks {cfg.serve_blocks} is outside the model: use 1..{total}")
        check_device(cfg.device)  # before asking it how much memory it has
        self.quant_type = self._choose_quant_type()
        check_device_runs(self.quant_type, cfg.device, self.dtype)  # refuse before joining, not at a first request

    # ---- placement and rebalancing ------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype blocks compute in (and non-quantized weights are stored in)."""
        return self.config.dtype or config_dtype(self.model_config)

    def _memory_bytes(self) -> int:
        cfg = self.config
        return cfg.memory_bytes if cfg.memory_bytes is not None else int(available_memory(cfg.device) * 0.8)

    def _choose_quant_type(self) -> QuantType:
        cfg = self.config
        if cfg.start is not None:
            wanted = cfg.end - cfg.start  # type: ignore[operator]
        else:
            wanted = cfg.serve_blocks or self.num_blocks
        span_bytes = {q: wanted * block_bytes(self.model_config, self.dtype, q) for q in AUTO_QUANT_ORDER}
        return choose_quant_type(cfg.quant_type, device=cfg.device, span_bytes=span_bytes,
                                 usable_bytes=self._memory_bytes() - cfg.cache_bytes)

    def span_length(self) -> int:
        """Blocks to serve under automatic placement: ``serve_blocks``, or as many as the memory holds (counting
        each block's weights as they take memory once quantized)."""
        cfg = self.config
        if cfg.serve_blocks is not None:
            return cfg.serve_blocks
        memory = self._memory_bytes()
        weights = block_bytes(self.model_config, self.dtype, self.quant_type)
        length = span_length_for_memory(memory - cfg.cache_bytes, weights, 0, self.num_blocks)
        if memory - cfg.cache_bytes < weights:
            raise ConfigurationError(
                f"not enough memory for one block: {memory / 2**20:.0f} MiB usable, a block takes "
                f"{weights / 2**20:.0f} MiB ({self.quant_type.value}) plus {cfg.cache_bytes / 2**20:.0f} MiB of "
                "cache budget; lower --cache-mib or raise --memory-mib"
                + (", or quantize the blocks (--quant-type nf4)" if self.quant_type == QuantType.NONE else ""))
        return length

    async def read_map(self) -> SwarmMap:
        assert self.store is not None and self.node is not None
        return await read_swarm(self.store, self.prefix, self.num_blocks)

    async def _choose_span(self) -> tuple[int, int]:
        swarm = await self.read_map()
        start, end = choose_span(swarm.servers.values(), self.num_blocks, self.span_length(), exclude=self.peer_id)
        logger.info("automatic placement: blocks %d:%d (%d server(s) in the swarm)", start, end, len(swarm.servers))
        return start, end

    async def _balance_loop(self) -> None:
        period = self.config.balance_period
        rng = random.Random()
        while True:
            await trio.sleep(rng.uniform(0, 2 * period))
            try:
                swarm = await self.read_map()
                swarm.servers[self.peer_id] = self.record()
                new_start = should_move(self.peer_id, swarm.servers.values(), self.num_blocks,
                                        balance_quality=self.config.balance_quality, rng=rng)
                if new_start is not None and self.moving_to is None:
                    await self._move_to(new_start)
            except Exception:  # noqa: BLE001 - a failed check is retried next period
                logger.exception("rebalancing check failed")

    async def _move_to(self, new_start: int) -> None:
        """Load the new span while the old one keeps serving, then switch (open sessions finish on the old one)."""
        cfg = self.config
        length = self.end_block - self.start_block  # type: ignore[operator]
        new_end = new_start + length
        logger.warning("rebalancing: moving from blocks %d:%d to %d:%d", self.start_block, self.end_block,
                       new_start, new_end)
        self.moving_to = new_start
        try:
            await self._announce_once()  # others see where we are going and do not rush there too
            span = await trio.to_thread.run_sync(
                lambda: BlockSpan.load(cfg.model, new_start, new_end, dtype=cfg.dtype, device=cfg.device,
                                       quant_type=self.quant_type))
        finally:
            self.moving_to = None
        service = self._make_service(span)
        self.span, self.service = span, service
        self.start_block, self.end_block = new_start, new_end
        if cfg.throughput is None:
            self._throughput = self._rates.throughput(length)
        self.moves += 1
        self.pings = PingAggregator()
        await self._announce_once()

    def _make_service(self, span: BlockSpan) -> SpanService:
        cfg = self.config
        if self.adapters is None:
            self.adapters = ServedAdapters.load(cfg.adapters, span.family, self.num_blocks, dtype=span.dtype,
                                                device=span.device)
        service = SpanService(span, cache_bytes=cfg.cache_bytes, max_session_length=cfg.max_session_length,
                              session_timeout=cfg.session_timeout, adapters=self.adapters, limits=cfg.limits)
        service.open_push_stream = self._open_push_stream
        return service

    async def _handle_rpc(self, stream: Any) -> None:
        assert self.service is not None
        await self.service.handle_rpc(stream)

    async def _handle_inference(self, stream: Any) -> None:
        assert self.service is not None
        await self.service.handle_inference(stream)

    async def _handle_push(self, stream: Any) -> None:
        assert self.service is not None
        await self.service.handle_push(stream)

    async def _open_push_stream(self, peer_id: str, addrs: list[str]) -> Any:
        assert self.node is not None
        self.node.remember_addrs(peer_id, addrs)
        return await self.node.open_stream(peer_id, PUSH)

    def _set_rates(self, span: BlockSpan) -> None:
        cfg = self.config
        if cfg.throughput is not None:
            self._rates = ThroughputInfo(cfg.throughput, cfg.throughput, float("inf"))
            self._throughput = cfg.throughput
            return
        bandwidth = cfg.bandwidth_mbps
        if bandwidth is None and self._joined_peers:
            bandwidth = self.node.call(measure_bandwidth_to_any, self.node, self._joined_peers)
            if bandwidth is not None:
                logger.info("measured %.0f Mbit/s to the swarm", bandwidth)
        self.measured_bandwidth_mbps = bandwidth
        self._rates = get_throughput(span, bandwidth_mbps=bandwidth, progress=cfg.progress)
        self._throughput = self._rates.throughput(span.num_blocks)

    # ---- pings to the servers of the next blocks ----------------------------------------------------------
    async def _ping_loop(self) -> None:
        rng = random.Random()
        while True:
            try:
                if self.end_block is not None and self.end_block < self.num_blocks:
                    swarm = await self.read_map()
                    nxt = [s.peer_id for s in swarm.servers_for(self.end_block) if s.peer_id != self.peer_id]
                    rng.shuffle(nxt)
                    for record in swarm.servers.values():
                        self.node.remember_addrs(record.peer_id, record.addrs)  # type: ignore[union-attr]
                    self._learn_relays(swarm)
                    await ping_many(self.node, nxt[:self.config.max_pinged], self.pings)
                else:
                    swarm = await self.read_map()
                    self._learn_relays(swarm)
                if self.auto and self.config.balance_period > 0 and self.moving_to is None:
                    # a hole is worth closing now rather than at the next (slower) balance check
                    swarm.servers[self.peer_id] = self.record()
                    new_start = should_move(self.peer_id, swarm.servers.values(), self.num_blocks,
                                            holes_only=True, rng=rng)
                    if new_start is not None:
                        await self._move_to(new_start)
            except Exception:  # noqa: BLE001 - pings are best effort
                logger.debug("pinging the next servers failed", exc_info=True)
            await trio.sleep(self.config.update_period)

    def _learn_relays(self, swarm: SwarmMap) -> None:
        relays = [r.peer_id for r in swarm.servers.values() if r.relay and r.peer_id != self.peer_id]
        for record in swarm.servers.values():
            if record.relay:
                self.node.remember_addrs(record.peer_id, record.addrs)  # type: ignore[union-attr]
        self.node.reach.add_known_relays(relays)  # type: ignore[union-attr]

    def _join(self, initial_peers: list[str]) -> None:
        assert self.node is not None
        if initial_peers:
            self._joined_peers = self.node.call(self.node.join, initial_peers)

    def record(self) -> ServerRecord:
        """This server's current announcement."""
        assert self.node is not None
        cfg = self.config
        pings = self.pings.to_dict()
        return ServerRecord(
            peer_id=self.node.peer_id, addrs=self.node.addrs, start=self.start_block, end=self.end_block,
            state=self.state, throughput=self._throughput, inference_rps=self._rates.inference_rps,
            forward_rps=self._rates.forward_rps,
            cache_tokens_left=self.service.cache_tokens_left() if self.service else 0,
            next_pings=dict(sorted(pings.items(), key=lambda kv: kv[1])[:16]), moving_to=self.moving_to,
            reachability=self.node.reach.status if self.node.reach else "unknown",
            relay=bool(self.node.reach and self.node.reach.relaying),
            dtype=str(self.span.dtype if self.span else cfg.dtype or "float32").removeprefix("torch."),
            quant_type=self.quant_type.value,
            adapters=list(self.adapters.names) if self.adapters else [],
            version=jupyter_swarm.__version__)

    def _addresses_changed(self) -> None:
        """Called on the trio thread when this server's addresses change (a relay slot gained or lost, a public
        address confirmed): announce them now rather than at the next refresh."""
        if self.state != ServerState.OFFLINE and self.node is not None:
            self.node.spawn(self._announce_quietly)

    async def _announce_quietly(self) -> None:
        try:
            await self._announce_once()
        except Exception:  # noqa: BLE001 - the next refresh retries
            logger.debug("announcing new addresses failed", exc_info=True)

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
        """Block until :meth:`stop` or :meth:`request_stop` is called (e.g. from a signal handler)."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        """Make :meth:`run_forever` return (safe in a signal handler); the caller then calls :meth:`stop`."""
        self._stop.set()

    def stop(self) -> None:
        """Announce 'offline', close every session and the host. Idempotent."""
        self._stop.set()
        node, self.node = self.node, None
        self.stage = STOPPED
        if node is None:
            return
        self.state = ServerState.OFFLINE
        self.node = node
        try:
            node.call(self._say_goodbye)
        except Exception:  # noqa: BLE001 - best effort: the records expire anyway
            pass
        self.node = None
        node.shutdown()

    async def _say_goodbye(self) -> None:
        """Announce 'offline' briefly; unreachable replicas must not hold up a shutdown."""
        with trio.move_on_after(GOODBYE_TIMEOUT):
            await self._announce_once(2.0)
