"""Reading the whole swarm: which models it serves and which servers hold which blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.dht.records import ServerRecord
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.dht.swarm_map import SwarmMap, read_models, read_swarm
from jupyter_swarm.errors import PeerUnavailableError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.swarm_key import SwarmKey


PROBE_TIMEOUT = 10.0  # connecting to one server for a probe
REREADS = 3  # a one-off reader reads again while each read finds servers the one before did not
REREAD_PAUSE = 1.0
HOLE_PUNCH_WAIT = 6.0  # how long a probe waits for relayed connections to become direct


def read_swarm_status(initial_peers: Sequence[str], model_prefix: str | None = None, *,
                      swarm_key: str | SwarmKey | None = None,
                      links: dict[str, str | None] | None = None) -> dict[str, SwarmMap]:
    """The swarm map of every model announced in the swarm (or just ``model_prefix``); ``swarm_key``: the key
    file of a private swarm (default: ``$JUPYTER_SWARM_KEY``).

    ``links``: a dict to fill with how this machine reaches each server: it connects to every one (directly, or
    through its relays), waits a few seconds for hole punches, and records "direct", "hole-punched", "relayed" or
    None (unreachable from here).
    """
    node = join_swarm(initial_peers, swarm_key=swarm_key)
    try:
        store = RecordStore(node, serve=False)

        async def read() -> dict[str, SwarmMap]:
            # a one-off reader knows few peers yet: read wide, so that no server's record is missed
            models = await read_models(store, wide=True)
            if model_prefix is not None:
                models = {k: v for k, v in models.items() if k == model_prefix}
            maps = {prefix: await _read_until_settled(store, prefix, num_blocks)
                    for prefix, num_blocks in sorted(models.items())}
            if links is not None:
                links.update(await _probe(node, [r for m in maps.values() for r in m.servers.values()]))
            return maps

        return node.call(read)
    finally:
        node.shutdown()


async def _read_until_settled(store: RecordStore, prefix: str, num_blocks: int) -> SwarmMap:
    """The map of ``prefix``, read again (a second later, failed replicas forgiven) while a read finds servers
    that the reads before it did not. A reader that just joined dials the replicas it learns of as it reads;
    behind NAT, through relays, a dial can outlast one request's timeout (the dial goes on in the background),
    and a map of one read could miss the servers whose records only those replicas hold."""
    swarm = await read_swarm(store, prefix, num_blocks, wide=True)
    for _ in range(REREADS):
        await trio.sleep(REREAD_PAUSE)
        store.forget_failures()
        again = await read_swarm(store, prefix, num_blocks, wide=True)
        new = set(again.servers) - set(swarm.servers)
        for peer, record in again.servers.items():
            swarm.keep(record, again.ttl_left[peer])
        if not new:
            break
    return swarm


async def _probe(node: P2PNode, records: list[ServerRecord]) -> dict[str, str | None]:
    for record in records:
        node.remember_addrs(record.peer_id, record.addrs)
    peers = sorted({r.peer_id for r in records})

    async def connect(peer: str) -> None:
        try:
            await node.dial(peer, timeout=PROBE_TIMEOUT)
        except PeerUnavailableError:
            pass  # reported as unreachable

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(connect, peer)
    with trio.move_on_after(HOLE_PUNCH_WAIT):  # the servers start hole punches on relayed connections at once
        while any(node.link(p) == "relayed" for p in peers):
            await trio.sleep(0.2)
    return {p: node.link(p) for p in peers}


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


def format_status(maps: dict[str, SwarmMap], links: dict[str, str | None] | None = None) -> str:
    """A human-readable table of servers and coverage per model; with ``links`` (a probe's result, see
    :func:`read_swarm_status`), how this machine reaches each server."""
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
                         f"cache {record.cache_tokens_left} tokens free  expires in "
                         f"{swarm.ttl_left.get(record.peer_id, 0):.0f} s  {reachability_text(record, links)}")
    return "\n".join(lines)


def connection_label(reachability: str, link: str | None) -> str:
    """One word for displays: how this peer reaches a server now ("direct", "hole-punched" -- direct after starting
    relayed --, "relayed"), else what the server announces ("public", "relayed", "private", "local", "unknown")."""
    return link or reachability


def reachability_text(record: ServerRecord, links: dict[str, str | None] | None = None) -> str:
    """``reachability relayed, relays for others; from here hole-punched``: what the server announces about how
    others reach it, and (with ``links``) how this peer reaches it."""
    text = f"reachability {record.reachability}" + (", relays for others" if record.relay else "")
    if links is not None:
        text += f"; from here {links.get(record.peer_id) or 'unreachable'}"
    return text
