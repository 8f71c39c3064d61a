"""A swarm client driven over stdin/stdout, so that tests can run it inside a network namespace.

    python -m tests.support.remote_client        # then one JSON command per line on stdin, one JSON answer per line

Commands:
    {"cmd": "connect", "model": PATH, "peers": [MADDR, ...]}
    {"cmd": "generate", "prompt": [[ids]], "max_new_tokens": N, "push": true, "max_length": 64,
     "allowed": [peer, ...] | null, "min_new_tokens": N | null, "widen": {"after": N, "allowed": [peer, ...]} | null}
        (``widen``: after N new tokens the client may use these servers too, e.g. a spare kept out until the
        test kills a server)
        -> {"tokens": [[...]], "token_times": [s, ...], "failovers": n, "routes": [[peer, start, end], ...],
            "links": {peer: "direct" | "hole-punched" | "relayed" | null}}
        while generating, prints {"event": "token", "count": i} after each new token
    {"cmd": "links"}                      -> {"links": {peer: kind}} for every server in the swarm map
    {"cmd": "map"}                        -> {"servers": {peer: {"reachability": ..., "addrs": [...], ...}}}
    {"cmd": "ping", "peers": [...]}       -> {"rtt": {peer: seconds | null}}
    {"cmd": "pings"}                      -> {"pings": {peer: seconds}}: the round trips routing uses (asks for a
                                             route first, which refreshes stale ones in the background)
    {"cmd": "dial", "peer": peer, "timeout": s} -> {"seconds": s, "error": null | "<type>: <message>"}
    {"cmd": "first_use", "peer": peer, "allowed": [...], "timeout": s, "prompt": [[ids]]}
        -> {"at": unix time, "used": bool, "attempts": n, "last_error": str | null, "last_route": [peer, ...]}:
           retries a one-token generation (allowed servers only) until one went through ``peer``
    {"cmd": "quit"}
Errors come back as {"error": "<type>: <message>"}.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

import torch


class _Clock:
    def __init__(self, on_token: Any = None) -> None:
        self.times: list[float] = []
        self.skip_prompt = True
        self.on_token = on_token

    def put(self, value: Any) -> None:
        if self.skip_prompt:  # generate() first puts the prompt
            self.skip_prompt = False
            return
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(len(self.times))
        _say({"event": "token", "count": len(self.times)})

    def end(self) -> None:
        pass


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    import logging
    import os

    if os.environ.get("JUPYTER_SWARM_DEBUG_P2P"):
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        logging.getLogger("libp2p").propagate = True  # py-libp2p keeps its records to itself otherwise
        for name in ("libp2p.relay.circuit_v2.dcutr", "jupyter_swarm.p2p", "jupyter_swarm.dht"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    from jupyter_swarm import AutoDistributedModelForCausalLM
    from jupyter_swarm.p2p.pings import ping_peer

    model = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            cmd = request["cmd"]
            if cmd == "quit":
                break
            if cmd == "connect":
                model = AutoDistributedModelForCausalLM.from_pretrained(request["model"],
                                                                        initial_peers=request["peers"])
                _say({"ok": True, "peer_id": model.swarm.node.peer_id})
            elif cmd == "generate":
                assert model is not None, "connect first"
                model.swarm.push = bool(request.get("push", True))
                allowed = request.get("allowed")
                model.swarm.allowed_servers = None if allowed is None else frozenset(allowed)
                widen = request.get("widen")

                def on_token(count: int, swarm: Any = model.swarm) -> None:
                    if widen and count == widen["after"]:
                        swarm.allowed_servers = frozenset(widen["allowed"])

                clock = _Clock(on_token)
                prompt = torch.tensor(request["prompt"])
                with model.inference_session(max_length=request.get("max_length", 64)) as session:
                    began = time.perf_counter()
                    extra = {"min_new_tokens": request["min_new_tokens"]} if request.get("min_new_tokens") else {}
                    out = model.generate(prompt, max_new_tokens=request["max_new_tokens"], do_sample=False,
                                         streamer=clock, **extra)
                    routes = [[r.peer_id, r.start, r.end] for r in session.routes]
                    failovers = session.failovers
                node = model.swarm.node
                links = {r[0]: node.call_sync(node.link, r[0]) for r in routes}
                _say({"tokens": out.tolist(), "token_times": [t - began for t in clock.times],
                      "failovers": failovers, "routes": routes, "links": links})
            elif cmd == "links":
                assert model is not None, "connect first"
                node = model.swarm.node
                swarm = model.swarm.read_map()
                _say({"links": {p: node.call_sync(node.link, p) for p in swarm.servers}})
            elif cmd == "map":
                assert model is not None, "connect first"
                swarm = model.swarm.read_map()
                _say({"servers": {p: {"reachability": r.reachability, "relay": r.relay, "addrs": r.addrs,
                                      "start": r.start, "end": r.end, "state": r.state.value}
                                  for p, r in swarm.servers.items()}})
            elif cmd == "ping":
                assert model is not None, "connect first"
                node = model.swarm.node
                _say({"rtt": {p: node.call(ping_peer, node, p, 10.0) for p in request["peers"]}})
            elif cmd == "pings":
                assert model is not None, "connect first"
                swarm_client = model.swarm
                try:
                    swarm_client.node.call(swarm_client.route, 0, swarm_client.num_blocks)
                except Exception:  # noqa: BLE001 - a missing block does not stop the pings
                    pass
                _say({"pings": swarm_client.node.call_sync(swarm_client.pings.to_dict)})
            elif cmd == "first_use":
                assert model is not None, "connect first"
                model.swarm.allowed_servers = frozenset(request["allowed"])
                model.swarm.wait_for_coverage = 0.5
                deadline = time.monotonic() + float(request.get("timeout", 300))
                attempts, last_error, last_route = 0, None, None
                while True:
                    attempts += 1
                    try:
                        with model.inference_session(max_length=16) as session:
                            model.generate(torch.tensor(request.get("prompt", [[1, 17, 42]])), max_new_tokens=1,
                                           do_sample=False)
                            last_route = [r.peer_id for r in session.routes]
                            used = request["peer"] in last_route
                    except Exception as e:  # noqa: BLE001 - not there yet: its blocks are missing, or it is unreachable
                        used, last_error = False, f"{type(e).__name__}: {e}"[:500]
                    if used or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                _say({"at": time.time(), "used": used, "attempts": attempts, "last_error": last_error,
                      "last_route": last_route})
            elif cmd == "dial":
                assert model is not None, "connect first"
                node = model.swarm.node
                model.swarm.read_map()  # learns the peer's announced addresses
                began = time.perf_counter()
                try:
                    node.call(node.dial, request["peer"], float(request.get("timeout", 15.0)))
                    error = None
                except Exception as e:  # noqa: BLE001 - the test looks at the message
                    error = f"{type(e).__name__}: {e}"
                _say({"seconds": time.perf_counter() - began, "error": error})
            else:
                _say({"error": f"ValueError: unknown command {cmd!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            _say({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
    if model is not None:
        model.close()


class RemoteClient:
    """The test's side: starts the client with ``launcher`` (e.g. ``ip netns exec NS``) and sends it commands."""

    def __init__(self, launcher: list[str], *, cwd: str, log_path: str | None = None):
        import subprocess

        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([*launcher, sys.executable, "-m", "tests.support.remote_client"], cwd=cwd,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def read(self) -> dict:
        """The next line from the client (an event or an answer)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the remote client exited (code {self.process.poll()}); log: {self.log_path}")
        return json.loads(line)

    def answer(self) -> dict:
        """The next answer, skipping token events."""
        while True:
            reply = self.read()
            if "event" not in reply:
                return reply

    def ask(self, **command: Any) -> dict:
        self.send(**command)
        reply = self.answer()
        if "error" in reply and command.get("cmd") != "dial":
            raise RuntimeError(f"remote client: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send(cmd="quit")
                self.process.wait(10)
            except Exception:  # noqa: BLE001
                self.process.kill()
        if self._log not in (None,) and hasattr(self._log, "close"):
            self._log.close()


if __name__ == "__main__":
    main()
