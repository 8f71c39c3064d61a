"""What a sybil that grinds peer ids near one record key can and cannot do to the swarm map.

Real libp2p hosts in one process (each on its own trio thread), talking the records protocol over loopback:

1. Grinding: how many fresh Ed25519 identities (and seconds) it takes to get ``--sybils`` ids closer to the target
   key than every honest replica, so that they become that key's replicas.
2. The map: ``--honest`` servers announce signed records under the target key and a control key, the sybils run
   lying replicas (withhold everything, or answer with forged, moved and replayed records), and a client reads
   both keys. Printed per number of sybils among the target key's replicas: how many honest records the client
   sees, and how many forged ones it accepted.
3. Flood: one sybil identity and then many fill an honest replica's store; how many of a server's records survive.

    python bench/bench_sybil.py                       # 12 honest servers, 0..5 sybils (~30 s)
"""

from __future__ import annotations

import argparse
import time

from jupyter_swarm.dht import store as store_module
from jupyter_swarm.dht.local_records import LocalRecords
from jupyter_swarm.dht.signed_records import sign_record
from jupyter_swarm.dht.store import PROTOCOL, REPLICAS, RecordStore, _distance
from jupyter_swarm.errors import ProtocolError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.identity import new_identity, peer_id_of
from jupyter_swarm.wire.messages import pack, unpack

TARGET, CONTROL = "bench-model.3", "bench-model.4"


def grind(key: str, honest_ids: list[str], count: int) -> tuple[list, int, float]:
    """Identities closer to ``key`` than every honest id: (key pairs, tries, seconds)."""
    best_honest = min(_distance(p.encode(), key.encode()) for p in honest_ids)
    found, tries, began = [], 0, time.perf_counter()
    while len(found) < count:
        pair = new_identity()
        tries += 1
        if _distance(peer_id_of(pair).encode(), key.encode()) < best_honest:
            found.append(pair)
    return found, tries, time.perf_counter() - began


class LyingReplica:
    """A sybil's records handler: takes every store, answers reads with forgeries (or nothing)."""

    def __init__(self, node: P2PNode, victims: list[str]):
        self.node, self.victims = node, victims
        self.seen: dict[tuple[str, str], bytes] = {}  # (key, signer) -> a record it was given (for replays)
        self.forge = True
        node.set_handler(PROTOCOL, self.handle)

    async def handle(self, stream) -> None:
        message = unpack(await stream.recv())
        if message["type"] == "store":
            for key, blob in message["values"].items():
                self.seen[(key, stream.remote_peer)] = blob
            await stream.send(pack({"type": "stored"}))
            return
        records = {}
        for key in message["keys"]:
            lies = {}
            if self.forge:
                for victim in self.victims:
                    # its own signature under the victim's sub-key, a record moved from another key, a replay
                    moved = self.seen.get((CONTROL if key == TARGET else TARGET, victim))
                    lies[victim] = [moved or sign_record(self.node.identity, [key], b"forged", 30.0), 3600.0]
            records[key] = lies
        await stream.send(pack({"type": "found", "records": records}))


def run_map_attack(honest_pairs: list, sybil_pairs: list, forge: bool) -> list[tuple[int, int, int, int, int]]:
    """For k = 0..len(sybil_pairs) sybils online: (k, sybils among the target's replicas, honest records the client
    sees under the target, forged records accepted, honest records seen under the control key)."""
    honest = [P2PNode(identity=pair).start() for pair in honest_pairs]
    stores = [RecordStore(node) for node in honest]
    reader_node = P2PNode(dht_server=False).start()
    reader = RecordStore(reader_node, serve=False)
    sybils: list[P2PNode] = []
    rows = []
    try:
        for node in honest:
            for other in honest:
                if other is not node:
                    node.call(node.connect, other.addrs[0])
            reader_node.call(reader_node.connect, node.addrs[0])
        for k in range(len(sybil_pairs) + 1):
            if k:
                sybil = P2PNode(identity=sybil_pairs[k - 1]).start()
                liar = LyingReplica(sybil, [n.peer_id for n in honest])
                liar.forge = forge
                sybils.append(sybil)
                for node in [*honest, reader_node]:
                    node.call(node.connect, sybil.addrs[0])
            for node, store in zip(honest, stores):
                node.call(store.put_many, {TARGET: f"record of {node.peer_id}".encode(),
                                           CONTROL: f"record of {node.peer_id}".encode()}, 60.0)
            replicas = reader.replicas_for(TARGET, include_self=False)
            sybil_ids = {s.peer_id for s in sybils}
            found = reader_node.call(reader.get_many, [TARGET, CONTROL])
            honest_ids = {n.peer_id for n in honest}
            genuine = sum(1 for s, (v, _) in found[TARGET].items() if s in honest_ids and v == f"record of {s}".encode())
            forged = sum(1 for s, (v, _) in found[TARGET].items() if v != f"record of {s}".encode())
            forged += sum(1 for s, (v, _) in found[CONTROL].items() if v != f"record of {s}".encode())
            rows.append((k, len(sybil_ids & set(replicas)), genuine, forged, len(found[CONTROL])))
    finally:
        for node in [*honest, *sybils, reader_node]:
            node.shutdown()
    return rows


def run_flood(identities: int, per_identity: int) -> tuple[int, int]:
    """A server's 40 records at a replica, then ``identities`` flooders try ``per_identity`` entries each:
    (the server's records left, entries held)."""
    store = LocalRecords()
    for block in range(40):
        store.put(f"bench-model.{block}", "server", b"x" * 1500, ttl=60)
    for n in range(identities):
        for i in range(per_identity):
            try:
                store.put(f"spam.{i}", f"sybil{n}", b"x" * 1500, ttl=3600)
            except ProtocolError:
                break
    return store.usage("server")[0], len(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--honest", type=int, default=12)
    parser.add_argument("--sybils", type=int, default=REPLICAS)
    args = parser.parse_args()
    store_module.logger.setLevel("ERROR")  # every rejected forgery logs a warning

    honest_ids = [peer_id_of(new_identity()) for _ in range(1000)]
    for swarm_size in (args.honest, 100, 1000):
        _pairs, tries, seconds = grind(TARGET, honest_ids[:swarm_size], args.sybils)
        print(f"grinding {args.sybils} ids closer to {TARGET!r} than all {swarm_size} honest peers: "
              f"{tries} identities, {seconds:.2f} s on one core ({tries / seconds:.0f} ids/s)")

    honest_pairs = [new_identity() for _ in range(args.honest)]
    sybil_pairs, _tries, _seconds = grind(TARGET, [peer_id_of(p) for p in honest_pairs], args.sybils)
    for forge in (False, True):
        rows = run_map_attack(honest_pairs, sybil_pairs, forge)
        print(f"\nsybils {'forging' if forge else 'withholding'}: "
              "sybils online | of the target's replicas | honest records seen (target) | forged accepted | "
              "records seen (control key)")
        for k, in_replicas, genuine, forged, control in rows:
            print(f"  {k} | {in_replicas}/{REPLICAS} | {genuine}/{args.honest} | {forged} | {control}/{args.honest}")

    kept, held = run_flood(1, 100_000)
    print(f"\nflood, 1 identity: the server keeps {kept}/40 records; the replica holds {held} entries")
    kept, held = run_flood(2000, 100)
    print(f"flood, 2000 identities: the server keeps {kept}/40 records; the replica holds {held} entries")


if __name__ == "__main__":
    main()
