"""Hostile clients that flood one server, run as their own process (so that they do not share the honest
client's interpreter):

    python -m tests.integration.flood SERVER_ADDR --clients 50

Each client is a separate libp2p peer (its own key) that, until SIGTERM or SIGINT, does all of:
  - sessions at maximum length: opens inference sessions of ``--max-length`` tokens (halved until they fit), has
    each compute ``--fill`` tokens (so it holds that much cache) and holds it idle, opening again whenever one is
    refused or evicted;
  - many streams: holds open more RPC and inference streams than the server takes from one peer;
  - oversized frames: announces frames over every protocol's limit (and 4 GiB ones);
  - record spam: stores of the most keys a request may hold, with values no one signed, and gets of many keys.
It prints ``ready`` once every client is attacking, and on exit one line of JSON: how often each attack ran and how
the server answered.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import threading
from collections import Counter

import torch
import trio

from jupyter_swarm.errors import SwarmError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.inference import Open, Step
from jupyter_swarm.wire.messages import unpack
from jupyter_swarm.wire.protocols import INFERENCE, RECORDS, RPC
from jupyter_swarm.wire.records import MAX_KEYS_PER_GET, MAX_KEYS_PER_STORE, Get, Store
from jupyter_swarm.wire.tensor_fields import WireTensor

HELD_STREAMS = 24  # per protocol and client: more than a server takes from one peer


def _answer_kind(payload: bytes) -> str:
    try:
        return f"ok:{unpack(payload)['type']}"
    except SwarmError as e:
        return "refused: " + re.sub(r"[\d.]+", "N", re.sub(r"12D3KooW\w+", "<peer>", str(e)))[:80]


async def attack(node: P2PNode, server: str, args: argparse.Namespace, stats: Counter) -> None:
    rng = random.Random(node.peer_id)

    fill = Step(WireTensor.encode(torch.randn(1, args.fill, args.hidden_size)), 0).encode() if args.fill else None

    max_length = [args.max_length]  # halved while the server says sessions this long cannot fit

    async def hold_sessions() -> None:
        while True:
            stream = None
            try:
                stream = await node.open_stream(server, INFERENCE)
                await stream.send(Open(max_length[0], 1).encode())
                stats["session opens"] += 1
                answer = _answer_kind(await stream.recv())
                stats[answer] += 1
                if answer.startswith("ok"):
                    if fill is not None:  # make the session hold memory: a prompt's worth of cache
                        await stream.send(fill)
                        stats["session fills: " + _answer_kind(await stream.recv())] += 1
                    stats["ended: " + _answer_kind(await stream.recv())] += 1  # held idle until evicted or closed
                elif "could need" in answer and max_length[0] > 2 * args.fill:
                    max_length[0] //= 2
            except SwarmError:
                stats["session streams closed"] += 1
            finally:
                if stream is not None:
                    await stream.close()
            await trio.sleep(args.pace)

    async def hold_streams(protocol: str) -> None:
        streams = []
        for _ in range(HELD_STREAMS):
            try:
                streams.append(await node.open_stream(server, protocol))
                stats[f"streams opened {protocol}"] += 1
            except SwarmError:
                stats["stream refused"] += 1
        await trio.sleep_forever()

    async def oversized_frames() -> None:
        while True:
            for protocol in (RPC, INFERENCE, RECORDS):
                try:
                    stream = await node.open_stream(server, protocol)
                    size = rng.choice([2**32 - 1, 600 * 2**20, 20 * 2**20, 2 * 2**20])
                    await stream._stream.write(size.to_bytes(4, "big") + rng.randbytes(1024))
                    stats["oversized frames"] += 1
                    with trio.move_on_after(2):
                        stats[_answer_kind(await stream.recv())] += 1
                    await stream.reset()
                except SwarmError:
                    stats["oversized: stream closed"] += 1
                await trio.sleep(args.pace)

    async def record_spam() -> None:
        while True:
            try:
                if rng.random() < 0.5:
                    values = {f"spam.{rng.randrange(10**9)}": rng.randbytes(rng.randrange(64, 2048))
                              for _ in range(MAX_KEYS_PER_STORE)}
                    request = Store(values, 3600.0)
                else:
                    request = Get([f"spam.{rng.randrange(10**9)}" for _ in range(MAX_KEYS_PER_GET)])
                stats["record requests"] += 1
                stats[_answer_kind(await node.request(server, RECORDS, request.encode(), 10.0))] += 1
            except SwarmError:
                stats["records: stream closed"] += 1
            await trio.sleep(args.pace)

    async with trio.open_nursery() as nursery:
        for _ in range(args.sessions):
            nursery.start_soon(hold_sessions)
        nursery.start_soon(hold_streams, RPC)
        nursery.start_soon(hold_streams, INFERENCE)
        nursery.start_soon(oversized_frames)
        nursery.start_soon(record_spam)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server", help="the server's full multiaddr (/ip4/.../p2p/...)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=4, help="sessions each client keeps trying to hold")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--fill", type=int, default=64, help="tokens each held session computes first (0: none)")
    parser.add_argument("--hidden-size", type=int, default=64, help="the model's hidden size (for --fill)")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between one client's repeated attacks")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stats: Counter = Counter()
    nodes = []
    try:
        for _ in range(args.clients):
            node = P2PNode(dht_server=False).start()
            nodes.append(node)
            server = node.call(node.connect, args.server)
            node.spawn_from_thread(attack, node, server, args, stats)
        print("ready", flush=True)
        stop.wait()
    finally:
        for node in nodes:
            node.shutdown()
        print(json.dumps(dict(stats)), flush=True)
        os._exit(0)  # the hosts' background threads are gone; skip the interpreter's slow teardown


if __name__ == "__main__":
    main()
