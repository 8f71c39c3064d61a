"""Cheap `jupyter-swarm serve` processes for chaos tests: a pre-imported parent (a "zygote") forks them on demand.

Starting a fresh Python server costs seconds of CPU, mostly importing torch, transformers and libp2p; a chaos
soak that SIGKILLs hundreds of servers cannot afford that. The zygote imports everything once and never starts
a thread, an event loop or a torch thread pool; each request forks a child that runs the real command line,
``jupyter_swarm.cli.main(["serve", ...])``, which starts its own libp2p host and trio thread after the fork.
The children are real server processes: they die by SIGKILL like any other, and stop on their own when the
zygote goes away (``--stop-with-parent``).

Protocol (lines of JSON on the zygote's stdin/stdout): ``{"argv": [...], "log": PATH}`` -> ``{"pid": N}``.
With ``"corrupt_every": N`` the child is a lying server: every N-th output it computes (inference steps and
forward requests alike) is replaced by noise of the same scale (its cache stays right), for the tests of verified
outputs (client/verification.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from jupyter_swarm.errors import SwarmError


class ForkedServer:
    """A `jupyter-swarm serve` process forked by the zygote; its output goes to ``log``."""

    def __init__(self, pid: int, log: Path, start: int, end: int):
        self.pid, self.log = pid, log
        self.start_block, self.end_block = start, end
        self.addrs: list[str] = []
        self.started_at = time.monotonic()
        self.ready_at: float | None = None

    def poll_ready(self) -> bool:
        """True once the server printed its addresses and "ready" (non-blocking)."""
        if self.ready_at is None:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if "ready" in (line.strip() for line in lines):
                self.addrs = [line.strip() for line in lines if line.strip().startswith("/ip4/")]
                self.ready_at = time.monotonic()
        return self.ready_at is not None

    def wait_ready(self, timeout: float = 60.0) -> "ForkedServer":
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if not self.alive or time.monotonic() > deadline:
                self.kill()
                raise SwarmError(f"forked server {self.start_block}:{self.end_block} did not start:\n"
                                 + (self.log.read_text()[-3000:] if self.log.exists() else "(no output)"))
            time.sleep(0.02)
        return self

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1]

    @property
    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server dies without saying goodbye."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Zygote:
    """The parent process that forks servers (see the module docstring)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process = subprocess.Popen([sys.executable, "-m", "tests.integration.server_zygote"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                        cwd=Path(__file__).resolve().parents[2])
        self._lock = threading.Lock()
        self._count = 0
        self.children: list[ForkedServer] = []
        self.global_options: list[str] = []  # before the subcommand, e.g. ["-v"] to debug the servers

    def fork_server(self, model: str, start: int, end: int, args: Sequence[str], *,
                    corrupt_every: int | None = None) -> ForkedServer:
        """Start `jupyter-swarm serve MODEL --blocks START:END ARGS...` (returns at once; see wait_ready);
        ``corrupt_every``: a lying server (see the module docstring)."""
        return self.fork(["serve", model, "--blocks", f"{start}:{end}", "--stop-with-parent", *args], start, end,
                         corrupt_every=corrupt_every)

    def fork(self, argv: Sequence[str], start: int = 0, end: int = 0, *,
             corrupt_every: int | None = None) -> ForkedServer:
        """Start `jupyter-swarm ARGV...` (a `serve` or a `bootstrap` command)."""
        with self._lock:
            self._count += 1
            log = self.workdir / f"{argv[0]}-{self._count}-{start}-{end}.log"
            argv = [*self.global_options, *argv]
            request = {"argv": argv, "log": str(log), "corrupt_every": corrupt_every}
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(json.dumps(request) + "\n")
            reply = self.process.stdout.readline()
        if not reply:
            raise SwarmError("the server zygote died")
        server = ForkedServer(json.loads(reply)["pid"], log, start, end)
        self.children.append(server)
        return server

    def close(self) -> None:
        for child in self.children:
            child.kill()
        if self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reap(*_: object) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _corrupt_outputs(every: int) -> None:
    """Make this server process return noise instead of every ``every``-th output it computes."""
    import torch

    from jupyter_swarm.runtime.service import SpanService

    computed = 0

    def lying(compute):  # noqa: ANN001, ANN202 - a test double around SpanService's static compute functions
        def run(*args):  # noqa: ANN002, ANN202
            nonlocal computed
            out = compute(*args)
            computed += 1
            if computed % every == 0:
                print(f"corrupting output {computed}", flush=True)
                return torch.randn_like(out) * out.std() + out.mean()
            return out
        return staticmethod(run)

    SpanService._inference_step = lying(SpanService._inference_step)
    SpanService._forward = lying(SpanService._forward)


def _serve_forever() -> None:
    # Everything a server imports, imported once here (no threads, loops or torch pools start on import).
    import jupyter_swarm.cli as cli
    import jupyter_swarm.runtime.bootstrap  # noqa: F401
    import jupyter_swarm.runtime.server  # noqa: F401 - torch, transformers, libp2p, trio, the model families

    signal.signal(signal.SIGCHLD, _reap)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setpgid(0, 0)  # a Ctrl-C in the test's terminal reaches the test, which then kills us
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            code = 1
            try:
                if request.get("corrupt_every"):
                    _corrupt_outputs(int(request["corrupt_every"]))
                code = cli.main(request["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve_forever()
