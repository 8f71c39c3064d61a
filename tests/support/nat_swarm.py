"""jupyter-swarm processes inside a namespaced topology (tests/support/netns.py): bootstrap nodes, servers, clients."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from jupyter_swarm.local_swarm import ServerProcess
from tests.support.netns import Topology
from tests.support.remote_client import RemoteClient

REPO = str(Path(__file__).resolve().parents[2])
SERVER_ARGS = ["--torch-threads", "1", "--update-period", "2"]


class BootstrapProcess:
    """`jupyter-swarm bootstrap` (in a namespace when ``launcher`` is ``ip netns exec NS``), with the addresses it
    printed."""

    def __init__(self, extra_args: Sequence[str] = (), launcher: Sequence[str] = ()):
        self.process = subprocess.Popen([*launcher, sys.executable, "-m", "jupyter_swarm.cli", "bootstrap",
                                         "--stop-with-parent", *extra_args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.addrs: list[str] = []
        self.output: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.strip().startswith("/ip4/"):
                self.addrs.append(line.strip())
            elif line.strip() == "ready":
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60) -> "BootstrapProcess":
        if not self._ready.wait(timeout) or self.process.poll() is not None or not self.addrs:
            raise RuntimeError("bootstrap node did not start:\n" + "".join(self.output[-30:]))
        return self

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_server(topo: Topology, namespace: str, model: str, start: int, end: int, peers: Sequence[str],
                 extra_args: Sequence[str] = ()) -> ServerProcess:
    """A `jupyter-swarm serve` in ``namespace`` (not waited for: call wait_ready())."""
    return ServerProcess(model, start, end, initial_peers=peers, extra_args=[*SERVER_ARGS, *extra_args],
                         launcher=topo.command(namespace, []))


def start_client(topo: Topology, namespace: str, log_path: str | None = None) -> RemoteClient:
    return RemoteClient(topo.command(namespace, []), cwd=REPO, log_path=log_path)
