"""A swarm across real NATs: servers in homes behind NAT routers, a bootstrap node on the "internet", a client in
another home (Linux network namespaces; tests/support/netns.py).

One topology serves the whole module:

    internet   bootstrap B (records, relay, AutoNAT); relay R2 (a second bootstrap node); s0: blocks 2:4 (public)
    home 1     s1: blocks 0:2
    home 2     s2: blocks 2:4, spare: blocks 0:2 (kept out of routes until a test lets the client use it)
    home 3     the client (tests/support/remote_client.py)
    home 4     s4: blocks 2:4, behind a NAT that maps each destination to a new port (no hole punching), with
               R2 as its only relay

What each test saw (links per server, stall after a kill) goes to test-artifacts/nat/report.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.nat_swarm import REPO, BootstrapProcess, start_client, start_server
from tests.support.netns import Topology, unavailable_reason
from tests.support.notebook_runner import NotebookRunner

REASON = unavailable_reason()
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"NAT tests: {REASON}")]

PROMPT = [[1, 17, 42, 99, 7, 230, 11]]
NEW_TOKENS = 24
ARTIFACTS = Path("test-artifacts/nat")
REPORT: dict[str, object] = {}


def _report(name: str, value: object) -> None:
    REPORT[name] = value
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.json").write_text(json.dumps(REPORT, indent=1))
    print(f"\n[nat report] {name}: {value}")


class Nat:
    """The module's topology and processes."""

    def __init__(self, topo: Topology, path: str, tmp: Path):
        self.topo, self.path = topo, path
        h1, h2, h3, h4 = topo.homes
        internet = topo.command(topo.internet, [])
        self.boot = BootstrapProcess(launcher=internet).wait_ready()
        self.relay2 = BootstrapProcess(["--listen", "/ip4/0.0.0.0/tcp/31338", "--initial-peers", *self.boot.addrs],
                                       launcher=internet)
        self.relay2.wait_ready()
        peers = self.boot.addrs
        self.s1 = start_server(topo, h1.host, path, 0, 2, peers)
        self.s2 = start_server(topo, h2.host, path, 2, 4, peers)
        self.spare = start_server(topo, h2.host, path, 0, 2, peers)
        self.s4 = start_server(topo, h4.host, path, 2, 4, peers, ["--relay", *self.relay2.addrs])
        self.s0 = start_server(topo, topo.internet, path, 2, 4, peers)
        self.servers = [self.s1, self.s2, self.spare, self.s4, self.s0]
        for server in self.servers:
            server.wait_ready()
        self.client = start_client(topo, h3.host, str(tmp / "client.log"))
        self.client.ask(cmd="connect", model=path, peers=peers)

    def generate(self, **kwargs: object) -> dict:
        return self.client.ask(cmd="generate", prompt=PROMPT, max_new_tokens=NEW_TOKENS, **kwargs)

    def wait_links(self, peers: list[str], want: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            links = self.client.ask(cmd="links")["links"]
            if all(links.get(p) == want for p in peers) or time.monotonic() > deadline:
                return {p: links.get(p) for p in peers}
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
        for server in self.servers:
            server.kill()
        self.relay2.kill()
        self.boot.kill()


@pytest.fixture(scope="module")
def nat(model_path, tmp_path_factory):
    topo = Topology(homes_count=4, symmetric_homes=[4]).build()
    swarm = None
    try:
        swarm = Nat(topo, model_path("llama"), tmp_path_factory.mktemp("nat"))
        yield swarm
    finally:
        if swarm is not None:
            swarm.close()
        topo.destroy()


@pytest.fixture(scope="module")
def expected(nat, local_model):
    return local_model(nat.path).generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def test_servers_behind_nat_announce_circuits_and_reachability(nat):
    servers = nat.client.ask(cmd="map")["servers"]
    for server in (nat.s1, nat.s2, nat.s4):
        record = servers[server.peer_id]
        assert record["reachability"] == "relayed", record
        assert any("/p2p-circuit" in a for a in record["addrs"]), record["addrs"]
        assert not any("/ip4/0.0.0.0/" in a for a in record["addrs"]), record["addrs"]
    assert all(f"/p2p/{nat.relay2.peer_id}/p2p-circuit" in a for a in servers[nat.s4.peer_id]["addrs"]
               if "/p2p-circuit" in a), "s4 was told to use relay R2 only"


def test_a_server_on_the_internet_is_confirmed_public_and_relays_for_others(nat):
    deadline = time.monotonic() + 40
    while True:
        record = nat.client.ask(cmd="map")["servers"][nat.s0.peer_id]
        if (record["reachability"] == "public" and record["relay"]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert record["reachability"] == "public" and record["relay"], record  # two peers dialed it back
    assert not any("/p2p-circuit" in a for a in record["addrs"]), record["addrs"]  # no relay slot needed
    assert any(a.startswith("/ip4/203.0.113.1/") for a in record["addrs"]), record["addrs"]


@pytest.mark.parametrize("push", [True, False], ids=["relayed-steps", "client-driven"])
def test_generation_across_nats_equals_local_then_goes_direct(nat, expected, push):
    chain = [nat.s1.peer_id, nat.s2.peer_id]
    first = nat.generate(push=push, allowed=chain)
    assert first["tokens"] == expected
    assert [r[0] for r in first["routes"]] == chain
    # Both servers are behind port-keeping NATs: hole punching turns the relayed connections into direct ones,
    # and later sessions use them.
    links = nat.wait_links(chain, "hole-punched", timeout=30)
    again = nat.generate(push=push, allowed=chain)
    assert again["tokens"] == expected
    _report(f"links ({'relayed steps' if push else 'client-driven'})",
            {"first generation": first["links"], "after hole punching": again["links"]})
    assert links == {p: "hole-punched" for p in chain}, links
    assert set(again["links"].values()) == {"hole-punched"}, again["links"]


def test_generation_through_relay_when_hole_punching_is_impossible(nat, expected):
    chain = [nat.s1.peer_id, nat.s4.peer_id]  # s4's NAT maps every destination to a new port
    result = nat.generate(push=True, allowed=chain)
    assert result["tokens"] == expected
    assert [r[0] for r in result["routes"]] == chain
    time.sleep(3)  # hole punch attempts to s4 have had time to fail
    again = nat.generate(push=False, allowed=chain)
    assert again["tokens"] == expected
    _report("links (symmetric NAT)", again["links"])
    assert again["links"][nat.s4.peer_id] == "relayed"
    # routing knows what the relayed hop costs: its round trip was measured through the relay (an unmeasured peer
    # would count as 0.15 s, a failed ping as 4 s)
    deadline = time.monotonic() + 20
    while (rtt := nat.client.ask(cmd="pings")["pings"].get(nat.s4.peer_id)) in (None, 4.0) and \
            time.monotonic() < deadline:
        time.sleep(1)
    _report("relayed round trip to s4 (s)", rtt)
    assert rtt is not None and rtt < 2.0, rtt


def test_a_circuit_through_a_relay_without_reservation_is_refused_quickly(nat, expected):
    # a server that announces a circuit through B while it holds no reservation there (--no-relay)
    fake_circuit = f"{nat.boot.addrs[0]}/p2p-circuit"
    liar = start_server(nat.topo, nat.topo.homes[3].host, nat.path, 0, 2, nat.boot.addrs,
                        ["--no-relay", "--announce", fake_circuit])
    nat.servers.append(liar)
    liar.wait_ready()
    answer = nat.client.ask(cmd="dial", peer=liar.peer_id, timeout=20)
    assert answer["error"] is not None and "NO_RESERVATION" in answer["error"], answer
    assert answer["seconds"] < 10, answer
    again = nat.client.ask(cmd="dial", peer=liar.peer_id, timeout=20)  # failed addresses are not retried at once
    assert "can be dialed now" in again["error"] and again["seconds"] < 1, again
    result = nat.generate(push=True, allowed=[liar.peer_id, nat.s1.peer_id, nat.s2.peer_id])
    assert result["tokens"] == expected
    assert liar.peer_id not in [r[0] for r in result["routes"]]
    liar.kill()


def test_status_shows_how_each_server_is_reached_from_another_home(nat):
    command = [sys.executable, "-m", "jupyter_swarm.cli", "status", "--probe", "--initial-peers", *nat.boot.addrs]
    result = nat.topo.run(nat.topo.homes[2].host, command, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {server.peer_id: next((line for line in result.stdout.splitlines() if server.peer_id in line), None)
             for server in (nat.s1, nat.s4)}
    assert None not in lines.values(), (lines, result.stdout[-3000:], result.stderr[-3000:])
    _report("status --probe from home 3", {peer[-8:]: line.split("reachability", 1)[1] for peer, line in lines.items()})
    assert "reachability relayed" in lines[nat.s1.peer_id] and "from here hole-punched" in lines[nat.s1.peer_id]
    assert "reachability relayed" in lines[nat.s4.peer_id] and "from here relayed" in lines[nat.s4.peer_id]


def test_a_notebook_kernel_at_home_serves_blocks_that_a_client_elsewhere_uses(nat, expected, tmp_path):
    kernel = NotebookRunner(nat.topo.command(nat.topo.homes[0].host, []), cwd=REPO,
                            log_path=str(tmp_path / "kernel.log"))
    try:
        for cell in ("%load_ext jupyter_swarm", f"%swarm connect {nat.path} --peers {' '.join(nat.boot.addrs)}",
                     "%swarm serve --blocks 0:2"):
            outcome = kernel.run(cell)
            assert outcome["error"] is None, (cell, outcome)
        outcome = kernel.run("print('SERVING', swarm.serving.wait_serving(300), swarm.serving.own_peer_id())")
        _, state, peer = outcome["text"].split()
        assert state == "serving", outcome
        result = nat.generate(push=True, allowed=[peer, nat.s2.peer_id])
        assert result["tokens"] == expected
        assert [r[0] for r in result["routes"]] == [peer, nat.s2.peer_id]
        peers = kernel.run("%swarm peers")["text"]
        _report("%swarm peers in the home-1 kernel", peers)
        own_row = next(line for line in peers.splitlines() if "(this kernel)" in line)
        assert "relayed" in own_row  # behind NAT, reachable through the bootstrap's relay
        s4_row = next(line for line in peers.splitlines() if nat.s4.peer_id[-12:] in line)
        assert "relayed" in s4_row
        # the swarm map's routing graph labels each server with how it is reached
        graph = kernel.run("from jupyter_swarm.notebook import SwarmMapWidget\nimport json, time\nm = SwarmMapWidget()\n"
                           "while m.refreshes < 1: time.sleep(0.1)\nprint(json.dumps(list(m.graph_fig.data[2].text)))\n"
                           "m.close()")
        assert graph["error"] is None, graph
        labels = json.loads(graph["text"])
        _report("swarm map labels in the home-1 kernel", labels)
        assert next(label for label in labels if label.startswith(nat.s4.peer_id[-6:])).endswith(" relayed"), labels
        assert next(label for label in labels if label.startswith(peer[-6:])).endswith("(you)"), labels
    finally:
        kernel.close()


def test_relay_dropping_circuits_mid_generation_fails_over(nat, expected):
    chain = [nat.s1.peer_id, nat.s4.peer_id]  # s4 is reachable only through R2
    nat.client.send(cmd="generate", prompt=PROMPT, max_new_tokens=NEW_TOKENS, push=False, allowed=chain,
                    widen={"after": 8, "allowed": [*chain, nat.s2.peer_id]})
    while True:
        event = nat.client.read()
        if event.get("event") == "token" and event["count"] == 8:
            nat.relay2.kill()  # every circuit through R2 drops
        if "event" not in event:
            break
    assert "error" not in event, event
    assert event["tokens"] == expected
    assert event["failovers"] >= 1
    assert nat.s4.peer_id not in [r[0] for r in event["routes"]]


def test_sigkill_of_a_home_server_mid_generation_with_a_spare_in_another_home(nat, expected):
    chain = [nat.s1.peer_id, nat.s2.peer_id]
    nat.client.send(cmd="generate", prompt=PROMPT, max_new_tokens=NEW_TOKENS, push=True, allowed=chain,
                    widen={"after": 10, "allowed": [*chain, nat.spare.peer_id]})
    while True:
        event = nat.client.read()
        if event.get("event") == "token" and event["count"] == 10:
            nat.s1.kill()
        if "event" not in event:
            break
    assert "error" not in event, event
    assert event["tokens"] == expected
    assert event["failovers"] >= 1
    assert [r[0] for r in event["routes"]][0] == nat.spare.peer_id
    gaps = [b - a for a, b in zip(event["token_times"], event["token_times"][1:])]
    _report("stall after SIGKILL of the home-1 server", {
        "stall_s": round(gaps[9], 3), "median_token_s": round(sorted(gaps)[len(gaps) // 2], 4),
        "links": event["links"]})
