"""A swarm of `jupyter-swarm serve` subprocesses on loopback, for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from jupyter_swarm.errors import SwarmError

START_TIMEOUT = 120.0


def default_spans(total: int) -> list[tuple[int, int]]:
    """A local swarm's layout for a model of ``total`` blocks: two halves, plus a third server overlapping the
    second half (so a server can fail and the model still runs)."""
    if total < 2:
        return [(0, total)]
    half = total // 2
    return [(0, half), (half, total), (max(0, half // 2), total)]


class ServerProcess:
    """One `jupyter-swarm serve` subprocess and the addresses it printed."""

    def __init__(self, model: str, start: int | None, end: int | None, *, initial_peers: Sequence[str] = (),
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None, new_session: bool = False,
                 launcher: Sequence[str] = ()):
        """``launcher``: a command prefix, e.g. ``ip netns exec NS`` to run the server in a network namespace."""
        self.start_block, self.end_block = start, end  # None: automatic placement (known once it printed its span)
        peers = ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
        blocks = ["--blocks", f"{start}:{end}"] if start is not None else []
        self.command = [*launcher, sys.executable, "-m", "jupyter_swarm.cli", "serve", model, *blocks, *peers,
                        "--stop-with-parent", *extra_args]
        # new_session: a Ctrl-C (SIGINT) sent to the parent's process group, e.g. a Jupyter kernel interrupt,
        # does not reach the servers; they stop only when told to (stop(), or the parent's exit handlers).
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})}, start_new_session=new_session)
        self.addrs: list[str] = []
        self.reachability: str | None = None  # as printed at start (p2p/reachability.py's statuses)
        self.output: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            stripped = line.strip()
            if stripped.startswith("/ip4/") or stripped.startswith("/ip6/"):
                self.addrs.append(stripped)
            elif stripped.startswith("reachability: "):
                self.reachability = stripped.split()[1].rstrip(";")
            elif stripped.startswith("serving blocks "):
                first, last = stripped.split()[2].split(":")
                self.start_block, self.end_block = int(first), int(last)
            elif stripped == "ready":
                self._ready.set()
        self._ready.set()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.output.append(line)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "ServerProcess":
        if not self._ready.wait(timeout) or self.process.poll() is not None or not self.addrs:
            self.process.kill()
            raise SwarmError(f"server for blocks {self.start_block}:{self.end_block} did not start:\n"
                             + "".join(self.output[-30:]))
        return self

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1]

    def kill(self) -> None:
        """SIGKILL: the server dies without saying goodbye."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT, like Ctrl-C; SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class LocalSwarm:
    """Start servers for ``spans`` of ``model``; the first one starts the swarm, the others join it."""

    new_session = False  # start servers in their own session (see ServerProcess)

    def __init__(self, model: str, spans: Sequence[tuple[int | None, int | None]], *, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, new_session: bool = False, swarm_key: str | None = None,
                 quant_type: str | None = None):
        """``swarm_key``: a key file; the servers form a private swarm with it (clients need the same file).
        ``quant_type``: how every server stores its blocks (``serve --quant-type``; None: the server's default);
        :meth:`add_server` can start one with another."""
        self.model = model
        self.extra_args = list(extra_args) + (["--swarm-key", str(swarm_key)] if swarm_key else [])
        self.quant_type = quant_type
        self.env = env
        self.new_session = new_session
        self.servers: list[ServerProcess] = []
        try:
            first, *rest = spans
            self.add_server(*first)
            joining = [self.add_server(start, end, wait=False) for start, end in rest]  # start in parallel
            for server in joining:
                server.wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def initial_peers(self) -> list[str]:
        alive = [s for s in self.servers if s.process.poll() is None]
        return [a for s in alive[:2] for a in s.addrs]

    def add_server(self, start: int | None = None, end: int | None = None, *, wait: bool = True,
                   extra_args: Sequence[str] = (), quant_type: str | None = None) -> ServerProcess:
        """Start one more server joining this swarm (``start=None``: it places its span itself)."""
        quant_type = quant_type or self.quant_type
        quantization = ["--quant-type", quant_type] if quant_type else []
        server = ServerProcess(self.model, start, end, initial_peers=self.initial_peers,
                               extra_args=[*self.extra_args, *quantization, *extra_args], env=self.env,
                               new_session=self.new_session)
        self.servers.append(server)
        if wait:
            server.wait_ready()
        return server

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        for server in self.servers:
            try:
                server.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                server.kill()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
