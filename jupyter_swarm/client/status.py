"""Reading the whole swarm: which models it serves and which servers hold which blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.dht.swarm_map import SwarmMap, read_models, read_swarm
from jupyter_swarm.p2p.swarm_key import SwarmKey


def read_swarm_status(initial_peers: Sequence[str], model_prefix: str | None = None, *,
                      swarm_key: str | SwarmKey | None = None) -> dict[str, SwarmMap]:
    """The swarm map of every model announced in the swarm (or just ``model_prefix``); ``swarm_key``: the key
    file of a private swarm (default: ``$JUPYTER_SWARM_KEY``)."""
    node = join_swarm(initial_peers, swarm_key=swarm_key)
    try:
        store = RecordStore(node, serve=False)

        async def read() -> dict[str, SwarmMap]:
            models = await read_models(store)
            if model_prefix is not None:
                models = {k: v for k, v in models.items() if k == model_prefix}
            return {prefix: await read_swarm(store, prefix, num_blocks) for prefix, num_blocks in sorted(models.items())}

        return node.call(read)
    finally:
        node.shutdown()


def map_summary(swarm: SwarmMap) -> dict[str, Any]:
    """A swarm map as JSON-able data: blocks, coverage, missing blocks, and every server's record with the
    seconds until it expires (``ttl_left``); what ``status --json`` prints and the Jupyter panel shows."""
    return {
        "model_prefix": swarm.model_prefix,
        "num_blocks": swarm.num_blocks,
        "coverage": swarm.coverage(),
        "missing_blocks": swarm.missing_blocks(),
        "servers": [{**record.to_wire(), "ttl_left": swarm.ttl_left.get(record.peer_id, 0.0)}
                    for record in sorted(swarm.servers.values(), key=lambda r: (r.start, r.end, r.peer_id))],
    }


def format_status(maps: dict[str, SwarmMap]) -> str:
    """A human-readable table of servers and coverage per model."""
    if not maps:
        return "no models are announced in this swarm (no server is online, or the records expired)"
    lines = []
    for prefix, swarm in maps.items():
        coverage = swarm.coverage()
        missing = swarm.missing_blocks()
        lines.append(f"model {prefix}: {swarm.num_blocks} blocks, {len(swarm.online())} server(s) online, "
                     + ("all blocks covered" if not missing else f"MISSING blocks {missing}"))
        lines.append("  coverage per block: " + " ".join(str(c) for c in coverage))
        for record in sorted(swarm.servers.values(), key=lambda r: (r.start, r.peer_id)):
            lines.append(f"  {record.peer_id}  blocks {record.start}:{record.end}  {record.state.value:8s} "
                         f"{record.dtype} {record.quant_type:4s}  throughput {record.throughput:8.1f} rps  "
                         f"cache {record.cache_tokens_left} tokens free  "
                         f"expires in {swarm.ttl_left.get(record.peer_id, 0):.0f} s")
    return "\n".join(lines)
