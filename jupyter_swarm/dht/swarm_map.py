"""The swarm map: which servers hold which blocks of a model, read from (and announced to) the records."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.store import RecordStore
from jupyter_swarm.errors import ProtocolError, RemoteError
from jupyter_swarm.wire.messages import field as message_field
from jupyter_swarm.wire.messages import pack, unpack

logger = logging.getLogger(__name__)


MODELS_KEY = "jupyter-swarm.models"
MEET_ROUNDS = 3


def block_key(model_prefix: str, block: int) -> str:
    """The swarm key of one block of one model."""
    return f"{model_prefix}.{block}"


@dataclass
class SwarmMap:
    """A snapshot of the servers of one model and the blocks they cover."""

    model_prefix: str
    num_blocks: int
    servers: dict[str, ServerRecord] = field(default_factory=dict)
    ttl_left: dict[str, float] = field(default_factory=dict)

    def servers_for(self, block: int, states: tuple[ServerState, ...] = (ServerState.ONLINE,)) -> list[ServerRecord]:
        """Servers whose span contains ``block`` and whose state is one of ``states``."""
        return [s for s in self.servers.values() if s.start <= block < s.end and s.state in states]

    def coverage(self, states: tuple[ServerState, ...] = (ServerState.ONLINE,)) -> list[int]:
        """How many servers hold each block."""
        return [len(self.servers_for(b, states)) for b in range(self.num_blocks)]

    def missing_blocks(self, states: tuple[ServerState, ...] = (ServerState.ONLINE,)) -> list[int]:
        """Blocks that no server (in one of ``states``) holds."""
        return [b for b, n in enumerate(self.coverage(states)) if n == 0]

    def keep(self, record: ServerRecord, ttl: float) -> None:
        """Hold ``record`` unless the map already has a record of its server that lives longer."""
        if ttl > self.ttl_left.get(record.peer_id, -1.0):
            self.servers[record.peer_id] = record
            self.ttl_left[record.peer_id] = ttl

    def online(self) -> list[ServerRecord]:
        """Online servers, ordered by span start."""
        return sorted((s for s in self.servers.values() if s.state == ServerState.ONLINE),
                      key=lambda s: (s.start, s.end, s.peer_id))


def encode_record(record: ServerRecord) -> bytes:
    return pack({"type": "record", "record": record.to_wire()})


def decode_record(value: bytes, *, num_blocks: int) -> ServerRecord | None:
    try:
        data = message_field(unpack(value, "record"), "record", dict)
    except (ProtocolError, RemoteError) as e:
        logger.warning("ignoring an unreadable swarm record: %s", e)
        return None
    return ServerRecord.from_wire(data, num_blocks=num_blocks)


async def announce(store: RecordStore, model_prefix: str, num_blocks: int, record: ServerRecord, ttl: float) -> int:
    """Publish ``record`` under every block of its span (and the model in the swarm's model list).

    Returns the fewest replicas any key reached.
    """
    value = encode_record(record)
    values = {block_key(model_prefix, b): value for b in record.span}
    values[MODELS_KEY] = pack({"type": "model", "prefix": model_prefix, "num_blocks": num_blocks})
    return await store.put_many(values, ttl)


async def read_models(store: RecordStore, *, wide: bool = False) -> dict[str, int]:
    """Models that servers of this swarm announce: {model prefix: number of blocks} (``wide``: read from more
    replicas)."""
    found = (await store.get_many([MODELS_KEY], wide=wide))[MODELS_KEY]
    models: dict[str, int] = {}
    for value, _ttl in found.values():
        try:
            entry = unpack(value, "model")
            prefix, num_blocks = message_field(entry, "prefix", str), message_field(entry, "num_blocks", int)
        except (ProtocolError, RemoteError) as e:
            logger.warning("ignoring an unreadable model announcement: %s", e)
            continue
        if 0 < num_blocks <= 100_000:
            models[prefix] = max(num_blocks, models.get(prefix, 0))
    return models


async def read_swarm(store: RecordStore, model_prefix: str, num_blocks: int, *, wide: bool = False) -> SwarmMap:
    """Read the current map of ``model_prefix`` from the swarm's records (``wide``: from more replicas).

    Every server holds records too, so the servers a read finds become replicas to ask (with the addresses their
    signed records give, relay circuits included). A reader whose view of the swarm differs from a writer's
    (it just joined; servers came and went) may miss records on the first pass, so it reads again from the
    servers it just met, up to ``MEET_ROUNDS`` times, until no new replica turns up."""
    swarm = SwarmMap(model_prefix, num_blocks)
    keys = {block_key(model_prefix, b): b for b in range(num_blocks)}
    for _ in range(MEET_ROUNDS):
        known = store.candidates()
        _merge(swarm, keys, await store.get_many(list(keys), wide=wide))
        live = [r for r in swarm.servers.values() if r.state != ServerState.OFFLINE and r.peer_id != store.node.peer_id]
        for record in live:
            store.node.remember_addrs(record.peer_id, record.addrs)
        store.learn(r.peer_id for r in live)
        if store.candidates() <= known:
            break
    return swarm


def _merge(swarm: SwarmMap, keys: dict[str, int], found: dict[str, dict[str, tuple[bytes, float]]]) -> None:
    for key, entries in found.items():
        block = keys[key]
        for subkey, (value, ttl) in entries.items():
            record = decode_record(value, num_blocks=swarm.num_blocks)
            if record is None:
                continue
            if record.peer_id != subkey or block not in record.span:
                logger.warning("ignoring a record of %s under block %d: it names peer %s, span %d:%d",
                               subkey, block, record.peer_id, record.start, record.end)
                continue
            swarm.keep(record, ttl)
