#!/usr/bin/env python
"""py-libp2p's QUIC transport against its TCP transport (Noise + yamux) on loopback, in the same run.

    python bench/bench_quic.py                 # ~1 min
    python bench/bench_quic.py --json bench/results/quic.json

Two plain py-libp2p hosts (``libp2p.new_host``) per transport; one echoes every message it reads on a stream. Measured:
connect time (dial + handshake), request/response round trips on one open stream (64 B, 16 KiB, 256 KiB; median),
and one-way bulk throughput (16 MiB in 256 KiB writes, acknowledged at the end). Ratios are QUIC / TCP. This is
the question issue 10 asks ("try QUIC; use it if it works and helps"): the swarm's traffic is small steps on long-lived
streams (per-token round trips) and occasional large ones (prefill, fine-tuning), so round trips and bulk
throughput are what matter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr

ECHO = TProtocol("/bench/echo/1")
SIZES = [64, 16 * 1024, 256 * 1024]
BULK = 16 * 1024 * 1024
CHUNK = 256 * 1024


async def _read_exactly(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = await stream.read(n - got)
        if not data:
            raise EOFError(f"stream ended after {got} of {n} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def _echo(stream) -> None:
    """Frames are a 4-byte length then the body; a zero-length frame asks for the count of bytes sunk since."""
    sunk = 0
    try:
        while True:
            n = int.from_bytes(await _read_exactly(stream, 4), "big")
            if n == 0:
                await stream.write(sunk.to_bytes(8, "big"))
                sunk = 0
            elif n & 0x80000000:  # bulk: swallow
                await _read_exactly(stream, n & 0x7FFFFFFF)
                sunk += n & 0x7FFFFFFF
            else:
                body = await _read_exactly(stream, n)
                await stream.write(n.to_bytes(4, "big") + body)
    except Exception:  # noqa: BLE001 - the benchmark closed the stream
        pass


async def _measure(transport: str, reps: int) -> dict:
    listen = (multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1") if transport == "quic"
              else multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0"))
    config = None if transport == "quic" else ConnectionConfig(max_connections_per_peer=1, min_connections=0)
    server = new_host(listen_addrs=[listen], connection_config=config)
    out: dict = {"transport": transport}
    async with server.run(listen_addrs=[listen]):
        server.set_stream_handler(ECHO, _echo)
        addr = f"{server.get_addrs()[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{server.get_id()}"
        connects = []
        for _ in range(reps):
            client = new_host(listen_addrs=[], connection_config=config, enable_quic=transport == "quic")
            async with client.run(listen_addrs=[]):
                began = time.perf_counter()
                await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                connects.append(time.perf_counter() - began)
                if len(connects) < reps:
                    continue
                stream = await client.new_stream(server.get_id(), [ECHO])
                rtts: dict[str, float] = {}
                for size in SIZES:
                    body = b"x" * size
                    samples = []
                    for _ in range(max(5, 200 // max(1, size // 16384))):
                        t = time.perf_counter()
                        await stream.write(size.to_bytes(4, "big") + body)
                        head = await _read_exactly(stream, 4)
                        await _read_exactly(stream, int.from_bytes(head, "big"))
                        samples.append(time.perf_counter() - t)
                    rtts[str(size)] = statistics.median(samples[1:])
                chunk = b"y" * CHUNK
                t = time.perf_counter()
                for _ in range(BULK // CHUNK):
                    await stream.write((CHUNK | 0x80000000).to_bytes(4, "big") + chunk)
                await stream.write((0).to_bytes(4, "big"))
                sunk = int.from_bytes(await _read_exactly(stream, 8), "big")
                bulk_s = time.perf_counter() - t
                assert sunk == BULK, sunk
                await stream.close()
                out["rtt_ms"] = {k: round(v * 1000, 3) for k, v in rtts.items()}
                out["bulk_mib_s"] = round(BULK / bulk_s / 2**20, 1)
        out["connect_ms"] = round(statistics.median(connects) * 1000, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="connections per transport (the last one is measured)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results: dict = {}
    for transport in ("tcp", "quic"):
        try:
            results[transport] = trio.run(_measure, transport, args.reps)
        except Exception as e:  # noqa: BLE001 - a transport that does not work is a result too
            results[transport] = {"transport": transport, "error": repr(e)[:500]}
        print(json.dumps(results[transport]), flush=True)
    tcp, quic = results["tcp"], results["quic"]
    if "error" not in tcp and "error" not in quic:
        results["quic_over_tcp"] = {
            "connect": round(quic["connect_ms"] / tcp["connect_ms"], 2),
            **{f"rtt_{k}": round(quic["rtt_ms"][k] / tcp["rtt_ms"][k], 2) for k in tcp["rtt_ms"]},
            "bulk": round(quic["bulk_mib_s"] / tcp["bulk_mib_s"], 3)}
        print(json.dumps({"quic_over_tcp": results["quic_over_tcp"]}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
