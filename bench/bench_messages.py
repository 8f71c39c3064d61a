"""What one py-libp2p message costs: a ping-pong of hidden-state-sized frames between two processes on loopback.

Two subprocesses with real ``P2PNode`` hosts (TCP, Noise, yamux, the project's framing): one echoes every frame, the
other sends a frame from its trio thread, waits for the echo, and repeats. In the same run, as baselines: the same
ping-pong over plain trio TCP sockets (the event loop without libp2p) and over blocking sockets (the kernel alone),
driven from this process.
Each side is measured in alternating rounds, so load from other users falls on all of them alike.

Per round trip it reports the median wall time and the CPU time of each process (from /proc), and "per message":
half a round trip's wall time, which is what one hop of a relayed step pays for messaging. ``--variants`` compares
the py-libp2p hot-path patches (p2p/hot_path.py) on and off in the same run:

    python bench/bench_messages.py                               # 2 KiB frames, patches on and off (~1 min)
    python bench/bench_messages.py --size 6144 --rounds 9 --json bench/results/messages.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

ECHO = "/jupyter-swarm-bench/echo/1.0.0"
PATCH_ENV = "JUPYTER_SWARM_LIBP2P_PATCHES"

_SERVER = r"""
import sys, trio
from jupyter_swarm.p2p.host import P2PNode
async def echo(stream):
    async for payload in stream.frames():
        await stream.send(payload)
node = P2PNode().start()
node.set_handler(sys.argv[1], echo)
print(node.addrs[0], flush=True)
sys.stdin.read()
node.shutdown()
"""

_TCP_SERVER = r"""
import socket, sys, trio
async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    async def handle(stream):
        buffer = bytearray()
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big"):
                size = 4 + int.from_bytes(buffer[:4], "big")
                frame, buffer = bytes(buffer[:size]), buffer[size:]
                await stream.send_all(frame)
    await trio.serve_listeners(handle, listeners)
trio.run(main)
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a whole process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, **(env or {})})
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def stop(process: subprocess.Popen) -> None:
    try:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(round_trips: Any, count: int, server_pid: int, client_pid: int) -> dict[str, float]:
    """Run ``round_trips(count)`` (which returns per-round-trip seconds) and add each end's CPU per round trip."""
    own, other = cpu_seconds(client_pid), cpu_seconds(server_pid)
    times = round_trips(count)
    own, other = cpu_seconds(client_pid) - own, cpu_seconds(server_pid) - other
    return {"rtt_ms": 1000 * statistics.median(times), "client_cpu_ms": 1000 * own / count,
            "server_cpu_ms": 1000 * other / count}


_PINGER = r"""
import json, os, sys, time
from jupyter_swarm.p2p.host import P2PNode
protocol, addr, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
node = P2PNode().start()
node.call(node.connect, addr)
stream = node.call(node.open_stream, addr.rsplit("/p2p/", 1)[1], protocol)
payload = os.urandom(size)
async def run(count):
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        await stream.send(payload)
        await stream.recv()
        out.append(time.perf_counter() - t0)
    return out
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(node.call(run, int(line))), flush=True)
node.call(stream.close)
node.shutdown()
"""


def libp2p_side(size: int, patches: str) -> tuple[Any, Any]:
    """Two subprocesses with ``JUPYTER_SWARM_LIBP2P_PATCHES=patches``: a py-libp2p echo server and a pinger that
    runs the round trips on its trio thread when asked (so this process's own patches do not matter)."""
    env = {PATCH_ENV: patches}
    server, addr = start(_SERVER, ECHO, env=env)
    pinger, ready = start(_PINGER, ECHO, addr, str(size), env=env)
    assert ready == "ready", ready

    def round_trips(count: int) -> list[float]:
        pinger.stdin.write(f"{count}\n")  # type: ignore[union-attr]
        pinger.stdin.flush()  # type: ignore[union-attr]
        return json.loads(pinger.stdout.readline())  # type: ignore[union-attr]

    def close() -> None:
        stop(pinger)
        stop(server)

    return (round_trips, server.pid, pinger.pid), close


def trio_side(size: int) -> tuple[Any, Any]:
    """Plain trio TCP (no libp2p): this process's trio loop runs in a thread as the host's does."""
    import trio
    from anyio.from_thread import start_blocking_portal

    process, port = start(_TCP_SERVER)
    portal_cm = start_blocking_portal(backend="trio")
    portal = portal_cm.__enter__()
    stream = portal.call(trio.open_tcp_stream, "127.0.0.1", int(port))
    frame = size.to_bytes(4, "big") + os.urandom(size)

    def round_trips(count: int) -> list[float]:
        async def run() -> list[float]:
            out = []
            for _ in range(count):
                t0 = time.perf_counter()
                await stream.send_all(frame)
                got = 0
                while got < len(frame):
                    got += len(await stream.receive_some(65536))
                out.append(time.perf_counter() - t0)
            return out

        return portal.call(run)

    def close() -> None:
        portal.call(stream.aclose)
        portal_cm.__exit__(None, None, None)
        stop(process)

    return (round_trips, process.pid, os.getpid()), close


def socket_side(size: int) -> tuple[Any, Any]:
    """Blocking sockets: what the kernel alone costs per round trip."""
    process, port = start(_TCP_SERVER)
    sock = socket.create_connection(("127.0.0.1", int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = size.to_bytes(4, "big") + os.urandom(size)

    def round_trips(count: int) -> list[float]:
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(frame)
            got = 0
            while got < len(frame):
                got += len(sock.recv(65536))
            out.append(time.perf_counter() - t0)
        return out

    def close() -> None:
        sock.close()
        stop(process)

    return (round_trips, process.pid, os.getpid()), close


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048, help="payload bytes per message (2048: one 512-float token)")
    p.add_argument("--count", type=int, default=500, help="round trips per round and side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["all", "none"],
                   help=f"values of {PATCH_ENV} (all, none, or a comma list of patches), each a side")
    p.add_argument("--json", help="write the medians here")
    args = p.parse_args(argv)

    sides: dict[str, tuple[Any, Any]] = {"sockets": socket_side(args.size), "trio TCP": trio_side(args.size)}
    for variant in args.variants:
        sides[f"libp2p, patches: {variant}"] = libp2p_side(args.size, variant)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    print(f"{args.size}-byte frames, {args.count} round trips x {args.rounds} rounds per side; "
          f"load average {os.getloadavg()[0]:.2f}")
    try:
        for name, ((round_trips, _, _), _) in sides.items():
            round_trips(50)  # warm up
        for r in range(args.rounds):
            names = list(sides)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                (round_trips, server_pid, client_pid), _ = sides[name]
                results[name].append(measure(round_trips, args.count, server_pid, client_pid))
    finally:
        for _, close in sides.values():
            close()
    summary = {}
    for name, rows in results.items():
        row = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        spread = (min(r["rtt_ms"] for r in rows), max(r["rtt_ms"] for r in rows))
        summary[name] = {**row, "rtt_ms_min": spread[0], "rtt_ms_max": spread[1]}
        print(f"  {name:34s} round trip {row['rtt_ms']:6.3f} ms ({spread[0]:.3f}-{spread[1]:.3f})  "
              f"per message {row['rtt_ms'] / 2:6.3f} ms   CPU per round trip: pinger "
              f"{row['client_cpu_ms']:.3f} ms, echo {row['server_cpu_ms']:.3f} ms")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"size": args.size, "count": args.count, "rounds": args.rounds, "sides": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
