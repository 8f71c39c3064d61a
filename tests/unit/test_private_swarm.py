"""Private swarms and who may connect: swarm key files, the key bound into Noise, allow-lists, Noise only."""

from __future__ import annotations

import os
import stat
import threading
import time

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from jupyter_swarm.errors import ConfigurationError, PeerUnavailableError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.p2p.identity import load_or_create_identity, new_identity, peer_id_of
from jupyter_swarm.p2p.swarm_key import (
    ENV_VAR, generate_swarm_key, load_swarm_key, resolve_swarm_key, write_swarm_key)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- key files -------------------------------------------------------------------------------------------------
def test_swarm_key_file_round_trip_is_private(tmp_path) -> None:
    path = tmp_path / "keys" / "swarm.key"
    key = write_swarm_key(path)
    assert _mode(path) == 0o600
    assert load_swarm_key(path) == key
    assert key.secret.hex() not in repr(key) and key.fingerprint in repr(key)
    assert [p.name for p in path.parent.iterdir()] == ["swarm.key"]  # no temporary file left behind
    with pytest.raises(ConfigurationError, match="already exists"):
        write_swarm_key(path)
    assert write_swarm_key(path, overwrite=True) != key


@pytest.mark.parametrize("text, error", [
    ("", "not a jupyter-swarm key file"),
    ("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32, "not a jupyter-swarm key file"),
    ("/jupyter-swarm/swarm-key/1.0.0/\n/base16/\n" + "zz" * 32, "not hexadecimal"),
    ("/jupyter-swarm/swarm-key/1.0.0/\n/base16/\n" + "ab" * 16, "has 16 bytes"),
])
def test_bad_swarm_key_files_are_refused(tmp_path, text, error) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=error):
        load_swarm_key(path)


def test_swarm_key_readable_by_others_or_missing_is_refused(tmp_path) -> None:
    path = tmp_path / "swarm.key"
    write_swarm_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_swarm_key(path)
    with pytest.raises(ConfigurationError, match="jupyter-swarm keygen"):
        load_swarm_key(tmp_path / "missing.key")


def test_swarm_key_comes_from_the_option_then_the_environment(tmp_path, monkeypatch) -> None:
    from_env, given = tmp_path / "env.key", tmp_path / "given.key"
    env_key, given_key = write_swarm_key(from_env), write_swarm_key(given)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_swarm_key(None) is None
    monkeypatch.setenv(ENV_VAR, str(from_env))
    assert resolve_swarm_key(None) == env_key
    assert resolve_swarm_key(str(given)) == given_key
    assert resolve_swarm_key(given_key) is given_key


def test_identity_file_is_private_and_atomic(tmp_path) -> None:
    path = tmp_path / "id" / "server.key"
    results: list[str] = []

    def create() -> None:
        results.append(peer_id_of(load_or_create_identity(path)))

    threads = [threading.Thread(target=create) for _ in range(8)]  # racing creators agree on one identity
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert _mode(path) == 0o600 and path.stat().st_size == 32
    assert [p.name for p in path.parent.iterdir()] == ["server.key"]
    path.chmod(0o640)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_or_create_identity(path)


# ---- connections -------------------------------------------------------------------------------------------------
def _eventually(check, timeout: float = 5.0) -> bool:
    """The listener registers a connection a moment after the dialer returns."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def nodes():
    started: list[P2PNode] = []

    def start(**kwargs) -> P2PNode:
        node = P2PNode(**kwargs).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.shutdown()


def test_same_swarm_key_connects(nodes) -> None:
    key = generate_swarm_key()
    server, client = nodes(swarm_key=key), nodes(swarm_key=key)
    assert client.call(client.connect, server.addrs[0]) == server.peer_id
    assert _eventually(lambda: server.call_sync(server.connected_peers) == [client.peer_id])


@pytest.mark.parametrize("server_key, client_key", [("a", "b"), ("a", None), (None, "a")],
                         ids=["wrong key", "client without key", "server without key"])
def test_peer_without_the_swarm_key_is_refused_at_connection_time(nodes, server_key, client_key) -> None:
    keys = {"a": generate_swarm_key(), "b": generate_swarm_key(), None: None}
    server, client = nodes(swarm_key=keys[server_key]), nodes(swarm_key=keys[client_key])
    with pytest.raises(PeerUnavailableError, match="do not hold the same swarm key"):
        client.call(client.connect, server.addrs[0])
    assert server.call_sync(server.connected_peers) == []
    assert client.call_sync(client.connected_peers) == []
    assert server.security.refused_inbound >= 1


def test_allow_list_refuses_other_peer_ids(nodes) -> None:
    allowed, other = new_identity(), new_identity()
    server = nodes(allowed_peers=[peer_id_of(allowed)])
    welcome, stranger = nodes(identity=allowed), nodes(identity=other)
    welcome.call(welcome.connect, server.addrs[0])
    with pytest.raises(PeerUnavailableError, match="allow-list"):
        stranger.call(stranger.connect, server.addrs[0])
    assert _eventually(lambda: server.call_sync(server.connected_peers) == [peer_id_of(allowed)])


def test_plaintext_peers_cannot_connect(nodes) -> None:
    """py-libp2p's default host accepts /plaintext/2.0.0, which lets a peer claim any peer id without proof; ours
    speaks Noise only. The impostor here claims the server's own public key."""
    server = nodes()
    victim_key = server.identity  # the impostor sends this public key but never proves it holds the private key

    async def dial_with_plaintext() -> str:
        host = new_host(key_pair=new_identity(), sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(
            victim_key)})
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(10):
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(server.addrs[0])))
            except Exception as e:  # noqa: BLE001 - refusal surfaces as one of py-libp2p's dial errors
                return f"refused: {type(e).__name__}"
            return "connected"

    assert trio.run(dial_with_plaintext).startswith("refused")
    assert server.call_sync(server.connected_peers) == []
