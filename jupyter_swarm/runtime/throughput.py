"""How fast a server is: measured once per device, model shape, dtype and quant type, then cached on disk.

* ``inference_rps``: inference steps per second through one block (batch 1, one new token, with a cache).
* ``forward_rps``: tokens per second of batched forward through one block.
* ``network_rps``: hidden states per second the network carries (bandwidth / bytes of one token's hidden state).
* ``throughput``, the balancing currency announced in the record (Petals' rule): the forward rate shared by the
  blocks a request typically uses on this server, capped by the network: ``min(forward_rps / ((n + 1) / 2),
  network_rps)`` for a span of ``n`` blocks.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from jupyter_swarm.paths import user_cache_dir

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTH_MBPS = 100.0
CACHE_ENV = "JUPYTER_SWARM_THROUGHPUT_CACHE"


@dataclass
class ThroughputInfo:
    inference_rps: float
    forward_rps: float
    network_rps: float

    def throughput(self, span_length: int) -> float:
        """Requests per second the swarm can expect from one block of a span of ``span_length`` blocks."""
        return max(1e-9, min(self.forward_rps / ((span_length + 1) / 2), self.network_rps))


def cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return user_cache_dir() / "throughput.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def cache_key(span: Any) -> str:
    config = span.config
    shape = [getattr(config, name, None) for name in
             ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")]
    quant_type = getattr(getattr(span, "quant_type", None), "value", "none")  # quantized blocks run at their own speed
    return json.dumps([device_name(span.device), str(span.dtype), quant_type, shape])


def network_rps(hidden_size: int, dtype: torch.dtype, bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS) -> float:
    """Tokens' hidden states per second through a link of ``bandwidth_mbps`` megabits per second."""
    bytes_per_token = hidden_size * torch.finfo(dtype).bits / 8 if dtype.is_floating_point else hidden_size * 4
    return bandwidth_mbps * 1e6 / 8 / bytes_per_token


def measure_compute(span: Any, *, steps: int = 8, forward_tokens: int = 128,
                    progress: bool = False) -> tuple[float, float]:
    """(inference steps/s, forward tokens/s) through one block of ``span``, measured on its first block;
    ``progress`` shows a tqdm bar (warm-up, inference steps, forward passes)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=2 + steps + 3, desc="measuring throughput", unit="pass", disable=not progress, leave=False)
    block = span.narrow(span.start, span.start + 1) if span.num_blocks > 1 else span
    hidden = torch.randn(1, 1, block.hidden_size, dtype=block.dtype, device=block.device) * 0.1
    with torch.inference_mode():
        cache = block.new_cache(1, steps + 4)
        for _ in range(2):
            block(hidden, cache=cache)
            bar.update()
        began = time.perf_counter()
        for _ in range(steps):
            block(hidden, cache=cache)
            bar.update()  # a bar update costs microseconds against a block's milliseconds
        inference_rps = steps / max(time.perf_counter() - began, 1e-9)
        batch = torch.randn(1, forward_tokens, block.hidden_size, dtype=block.dtype, device=block.device) * 0.1
        block(batch)
        bar.update()
        began = time.perf_counter()
        for _ in range(2):
            block(batch)
            bar.update()
        forward_rps = 2 * forward_tokens / max(time.perf_counter() - began, 1e-9)
    bar.close()
    return inference_rps, forward_rps


def get_throughput(span: Any, *, bandwidth_mbps: float | None = None, use_cache: bool = True,
                   progress: bool = False) -> ThroughputInfo:
    """Measured rates of this device for this model shape (read from the cache when measured before);
    ``progress``: a tqdm bar while measuring."""
    key = cache_key(span)
    path = cache_path()
    cached: dict[str, Any] = {}
    if use_cache:
        try:
            cached = json.loads(path.read_text())
            if not isinstance(cached, dict):
                cached = {}
        except (OSError, ValueError):
            cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                       for k in ("inference_rps", "forward_rps")):
        inference_rps, forward_rps = float(entry["inference_rps"]), float(entry["forward_rps"])
    else:
        logger.info("measuring throughput once for this device and model shape (cached in %s)", path)
        inference_rps, forward_rps = measure_compute(span, progress=progress)
        cached[key] = {"inference_rps": inference_rps, "forward_rps": forward_rps, "measured_at": time.time()}
        if use_cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cached, indent=1))
                tmp.replace(path)
            except OSError as e:
                logger.debug("could not cache throughput in %s: %r", path, e)
    net = network_rps(span.hidden_size, span.dtype, bandwidth_mbps or DEFAULT_BANDWIDTH_MBPS)
    return ThroughputInfo(inference_rps=inference_rps, forward_rps=forward_rps, network_rps=net)


__all__ = ["ThroughputInfo", "get_throughput", "measure_compute", "network_rps", "cache_path", "asdict"]
