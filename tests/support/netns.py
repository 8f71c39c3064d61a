"""Real networks for tests and benchmarks: an "internet" and homes behind NAT routers, built from Linux network
namespaces, veth pairs and nftables.

    topo = Topology(homes=3).build()          # needs root, `ip` and `nft`: see unavailable_reason()
    try:
        proc = topo.popen(topo.homes[0].host, [sys.executable, "-m", "jupyter_swarm.cli", ...])
    finally:
        topo.destroy()                         # kills what ran inside, deletes namespaces (and with them their rules)

Layout (addresses are documentation/private ranges that exist only inside these namespaces):

    internet ns  <name>-net   bridge 203.0.113.1/24 (peers that run here are "public")
    home i       <name>-r<i>  router: wan 203.0.113.(10+i) on the bridge, lan 10.<i>.0.1/24, masquerade, a home
                              router's firewall (nothing new comes in from the wan)
                 <name>-h<i>  host: 10.<i>.0.2/24, default route via its router

A home created with ``symmetric=True`` masquerades with ``random`` ports: each new connection (so each destination)
gets a new outside port, the NAT that defeats hole punching.

Every namespace name starts with ``js10-<pid><random>``; :func:`sweep_stale` deletes namespaces left by a process
that died before it could clean up (a SIGKILLed pytest), so nothing accumulates between runs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

PREFIX = "js10-"
INTERNET_SUBNET = "203.0.113"


def _run(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, text=True, capture_output=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaced topologies cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespace tests need root (CAP_NET_ADMIN); CI runs them as root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {package}); CI's .ci/run installs it"
    probe = f"{PREFIX}{os.getpid()}probe{secrets.token_hex(2)}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"cannot create a network namespace here: {detail.strip()}"
    try:
        _run("ip", "netns", "exec", probe, "nft", "list", "tables")
    except subprocess.CalledProcessError as e:
        return f"nftables does not work in a network namespace here: {e.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete ``js10-`` namespaces whose creating process is gone; returns their names."""
    removed = []
    listing = _run("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        digits = ""
        for ch in name[len(PREFIX):]:
            if not ch.isdigit():
                break
            digits += ch
        if digits and not _pid_alive(int(digits)):
            _kill_namespace_processes(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_namespace_processes(namespace: str) -> None:
    pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Home:
    """One home: a host behind its own NAT router."""

    index: int
    router: str  # namespace names
    host: str
    wan_ip: str  # the router's address on the internet
    host_ip: str  # the host's private address
    symmetric: bool = False


@dataclass
class Topology:
    """An internet namespace and ``homes`` NATed homes (see the module docstring)."""

    homes_count: int = 3
    symmetric_homes: Sequence[int] = ()  # 1-based indices of homes whose NAT maps each destination to a new port
    name: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}{secrets.token_hex(3)}")
    internet: str = ""
    internet_ip: str = f"{INTERNET_SUBNET}.1"
    homes: list[Home] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _processes: list[subprocess.Popen] = field(default_factory=list)

    def build(self) -> "Topology":
        """Create every namespace, link and rule; on any failure, remove what was made and re-raise."""
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_namespace(self, suffix: str) -> str:
        name = f"{self.name}-{suffix}"
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _ip(namespace: str, *argv: str) -> None:
        _run("ip", "-n", namespace, *argv)

    def _build(self) -> None:
        sweep_stale()
        self.internet = self._add_namespace("net")
        self._ip(self.internet, "link", "add", "br0", "type", "bridge")
        self._ip(self.internet, "addr", "add", f"{self.internet_ip}/24", "dev", "br0")
        self._ip(self.internet, "link", "set", "br0", "up")
        for i in range(1, self.homes_count + 1):
            router, host = self._add_namespace(f"r{i}"), self._add_namespace(f"h{i}")
            wan_ip, lan_prefix = f"{INTERNET_SUBNET}.{10 + i}", f"10.{i}.0"
            # veth pairs created straight inside their namespaces: names need only be unique per namespace
            _run("ip", "link", "add", "wan", "netns", router, "type", "veth", "peer", "name", f"home{i}",
                 "netns", self.internet)
            _run("ip", "link", "add", "lan", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", host)
            self._ip(self.internet, "link", "set", f"home{i}", "master", "br0")
            self._ip(self.internet, "link", "set", f"home{i}", "up")
            self._ip(router, "addr", "add", f"{wan_ip}/24", "dev", "wan")
            self._ip(router, "addr", "add", f"{lan_prefix}.1/24", "dev", "lan")
            self._ip(router, "link", "set", "wan", "up")
            self._ip(router, "link", "set", "lan", "up")
            self._ip(host, "addr", "add", f"{lan_prefix}.2/24", "dev", "eth0")
            self._ip(host, "link", "set", "eth0", "up")
            self._ip(host, "route", "add", "default", "via", f"{lan_prefix}.1")
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            symmetric = i in self.symmetric_homes
            _run("ip", "netns", "exec", router, "nft", "-f", "-", input=_router_rules(symmetric))
            self.homes.append(Home(i, router, host, wan_ip, f"{lan_prefix}.2", symmetric))

    # ---- processes inside ------------------------------------------------------------------------
    def command(self, namespace: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    def popen(self, namespace: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start ``argv`` inside ``namespace``; it is killed by :meth:`destroy` if still running."""
        proc = subprocess.Popen(self.command(namespace, argv), **kwargs)  # type: ignore[call-overload]
        self._processes.append(proc)
        return proc

    def run(self, namespace: str, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(namespace, argv), text=True, capture_output=True, timeout=timeout)

    def destroy(self) -> None:
        """Kill every process started inside, then delete the namespaces (their links and nftables go with them)."""
        for proc in self._processes:
            if proc.poll() is None:
                proc.kill()
        deadline = time.monotonic() + 5
        for proc in self._processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for namespace in reversed(self._namespaces):
            _kill_namespace_processes(namespace)
            _run("ip", "netns", "exec", namespace, "nft", "flush", "ruleset", check=False)
            _run("ip", "netns", "del", namespace, check=False)
        self._namespaces.clear()
        self._processes.clear()

    def __enter__(self) -> "Topology":
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _router_rules(symmetric: bool) -> str:
    """nftables for a home router: masquerade out of the wan, nothing new in from it (no port forwarding)."""
    masquerade = "masquerade random" if symmetric else "masquerade"
    return f"""
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {masquerade}
    }}
}}
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
}}
"""
