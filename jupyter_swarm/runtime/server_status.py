"""What a block server is doing right now, as plain data for displays (the notebook's serve panel, logs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: the stages a server goes through while it starts, in order; then "stopped"
STARTING_STAGES = ("joining the swarm", "choosing blocks", "loading weights", "measuring throughput")
SERVING = "serving"
STOPPED = "stopped"
#: the counters of a span's service (runtime.service.ServiceStats) that a status shows
SERVED_COUNTERS = ("inference_steps", "forward_requests", "backward_requests", "sessions_opened", "open_sessions",
                   "errors")


def stage_step(stage: str) -> int:
    """0-3 while starting (the index in STARTING_STAGES), 4 once serving or stopped."""
    return STARTING_STAGES.index(stage) if stage in STARTING_STAGES else len(STARTING_STAGES)


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one block server (:meth:`jupyter_swarm.runtime.server.BlockServer.status`).

    ``stage`` is one of :data:`STARTING_STAGES`, ``"serving"`` or ``"stopped"``; ``step`` is its index (0-3 while
    starting, 4 once serving). Block fields are None until the span is chosen; counters are 0 until it serves.
    """

    stage: str
    step: int
    peer_id: str | None = None
    addrs: list[str] = field(default_factory=list)
    start_block: int | None = None
    end_block: int | None = None
    num_blocks: int | None = None
    dtype: str | None = None
    quant_type: str = "none"
    throughput: float = 0.0
    weights_bytes: int = 0
    cache_used_bytes: int = 0
    cache_total_bytes: int = 0
    inference_steps: int = 0
    forward_requests: int = 0
    backward_requests: int = 0
    sessions_opened: int = 0
    open_sessions: int = 0
    errors: int = 0
    moves: int = 0

    @property
    def requests(self) -> int:
        """Every request served: inference steps, forward and backward passes."""
        return self.inference_steps + self.forward_requests + self.backward_requests

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able data (with ``requests``)."""
        return {**asdict(self), "requests": self.requests}
