"""The server record: what a server announces in the swarm for each block it serves."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from jupyter_swarm.p2p.reachability import STATUSES as REACHABILITY

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
MAX_NAME_CHARS = 32


class ServerState(str, Enum):
    """Lifecycle of a server: it announces itself joining while loading, online while serving."""

    OFFLINE = "offline"
    JOINING = "joining"
    ONLINE = "online"


@dataclass
class ServerRecord:
    """One server's announcement: where it listens, which span it holds, how fast and how full it is."""

    peer_id: str
    addrs: list[str]
    start: int
    end: int
    state: ServerState = ServerState.JOINING
    throughput: float = 1.0  # requests/s the swarm can expect for one block, the balancing currency
    inference_rps: float = 1.0  # inference steps/s through one block
    forward_rps: float = 1.0  # tokens/s of batched forward through one block
    cache_tokens_left: int = 0
    dtype: str = "float32"
    quant_type: str = "none"  # how its blocks' linear layers are stored: none, int8, nf4 or fp4
    adapters: list[str] = field(default_factory=list)
    next_pings: dict[str, float] = field(default_factory=dict)  # RTT (s) to servers of the next blocks
    moving_to: int | None = None  # start of the span this server is loading to move to (it still serves start:end)
    reachability: str = "unknown"  # public, relayed (behind NAT: its addrs include circuits), private, local
    relay: bool = False  # relays for peers behind NAT
    version: str = ""
    record_version: int = RECORD_VERSION

    @property
    def span(self) -> range:
        return range(self.start, self.end)

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_wire(cls, data: Any, *, num_blocks: int | None = None) -> "ServerRecord | None":
        """Parse a peer's record; a record with nonsense in it is ignored (None) with a warning."""
        try:
            record = cls._parse(data)
            if num_blocks is not None and record.end > num_blocks:
                raise ValueError(f"span {record.start}:{record.end} is outside the model's {num_blocks} blocks")
            if num_blocks is not None and record.moving_to is not None and \
                    record.moving_to + record.end - record.start > num_blocks:
                raise ValueError(f"moving_to {record.moving_to} puts the span outside the model's {num_blocks} blocks")
            return record
        except (TypeError, ValueError, KeyError) as e:
            peer = data.get("peer_id", "?") if isinstance(data, dict) else "?"
            logger.warning("ignoring an invalid swarm record from peer %s: %s", peer, e)
            return None

    @classmethod
    def _parse(cls, data: Any) -> "ServerRecord":
        if not isinstance(data, dict):
            raise TypeError(f"record must be a map, got {type(data).__name__}")
        start, end = _int(data, "start"), _int(data, "end")
        if not 0 <= start < end:
            raise ValueError(f"span {start}:{end} is empty or negative")
        addrs = data.get("addrs", [])
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            raise TypeError("addrs must be a list of strings")
        pings = data.get("next_pings", {})
        if not isinstance(pings, dict):
            raise TypeError("next_pings must be a map")
        adapters = data.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise TypeError("adapters must be a list of strings")
        peer_id = data.get("peer_id")
        if not isinstance(peer_id, str) or not peer_id:
            raise TypeError("peer_id must be a non-empty string")
        quant_type = data.get("quant_type", "none")
        if not isinstance(quant_type, str) or not 0 < len(quant_type) <= MAX_NAME_CHARS:
            raise TypeError(f"quant_type must be a name of at most {MAX_NAME_CHARS} characters")
        moving_to = data.get("moving_to")
        if moving_to is not None:
            moving_to = _int(data, "moving_to")
            if moving_to < 0:
                raise ValueError(f"moving_to must be a block index, got {moving_to}")
        reachability = data.get("reachability", "unknown")
        if reachability not in REACHABILITY:
            raise ValueError(f"reachability must be one of {', '.join(REACHABILITY)}, got {reachability!r}")
        relay = data.get("relay", False)
        if not isinstance(relay, bool):
            raise TypeError(f"relay must be true or false, got {relay!r}")
        return cls(
            peer_id=peer_id,
            addrs=addrs,
            start=start,
            end=end,
            state=ServerState(data.get("state", "joining")),
            throughput=_rate(data, "throughput"),
            inference_rps=_rate(data, "inference_rps"),
            forward_rps=_rate(data, "forward_rps"),
            cache_tokens_left=max(0, _int(data, "cache_tokens_left", 0)),
            dtype=str(data.get("dtype", "float32")),
            quant_type=quant_type,
            adapters=adapters,
            next_pings={str(k): _positive(v, "ping") for k, v in pings.items()},
            moving_to=moving_to,
            reachability=reachability,
            relay=relay,
            version=str(data.get("version", "")),
            record_version=_int(data, "record_version", RECORD_VERSION),
        )


def _int(data: dict, name: str, default: int | None = None) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


def _rate(data: dict, name: str) -> float:
    return _positive(data.get(name, 1.0), name)


def _positive(value: Any, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)
