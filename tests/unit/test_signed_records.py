"""Signed records (a replica cannot forge, move, extend or replay them) and the bounded local record store."""

from __future__ import annotations

import time

import msgpack
import pytest

from jupyter_swarm.dht.local_records import LocalRecords
from jupyter_swarm.dht.signed_records import MAX_CLOCK_SKEW, MAX_TTL, sign_record, verify_record
from jupyter_swarm.errors import ProtocolError
from jupyter_swarm.p2p.identity import new_identity, peer_id_of

ALICE, MALLORY = new_identity(), new_identity()
A, M = peer_id_of(ALICE), peer_id_of(MALLORY)


def test_a_signed_record_verifies_under_each_key_it_names() -> None:
    blob = sign_record(ALICE, ["m.0", "m.1"], b"payload", ttl=30)
    for key in ("m.0", "m.1"):
        record = verify_record(blob, key=key, signer=A)
        assert record.value == b"payload" and record.signer == A
        assert 29 < record.seconds_left() <= 30


def _tampered(blob: bytes, **changes) -> bytes:
    data = msgpack.unpackb(blob)
    data.update(changes)
    return msgpack.packb(data, use_bin_type=True)


@pytest.mark.parametrize("attack, error", [
    ("claimed by another peer", "signature is not"),
    ("moved to another key", "signed for other keys"),
    ("payload changed", "signature is not"),
    ("life extended", "signature is not"),
    ("life beyond the maximum", "lives at most"),
    ("expired", "expired"),
    ("issued in the future", "in the future"),
    ("nan expiry", "finite"),
    ("garbage", "not valid msgpack"),
    ("truncated signature", "64-byte signature"),
    ("not a peer id", "not a peer id"),
])
def test_what_a_replica_cannot_do_to_a_record(attack, error) -> None:
    now = time.time()
    blob = sign_record(ALICE, ["m.0"], b"payload", ttl=30)
    key, signer = "m.0", A
    if attack == "claimed by another peer":
        signer = M
    elif attack == "moved to another key":
        key = "other-model.0"
    elif attack == "payload changed":
        blob = _tampered(blob, value=b"forged")
    elif attack == "life extended":
        blob = _tampered(blob, expires=msgpack.unpackb(blob)["expires"] + 600)
    elif attack == "life beyond the maximum":
        blob = sign_record(ALICE, ["m.0"], b"payload", ttl=MAX_TTL)
        blob = _tampered(blob, expires=msgpack.unpackb(blob)["issued"] + MAX_TTL + 1)
    elif attack == "expired":
        blob = sign_record(ALICE, ["m.0"], b"payload", ttl=30, now=now - 60)  # a replay of an old record
    elif attack == "issued in the future":
        blob = sign_record(ALICE, ["m.0"], b"payload", ttl=30, now=now + 10 * MAX_CLOCK_SKEW)
    elif attack == "nan expiry":
        blob = _tampered(blob, expires=float("nan"))
    elif attack == "garbage":
        blob = b"\xc1\x00garbage"
    elif attack == "truncated signature":
        blob = _tampered(blob, sig=b"\x00" * 10)
    elif attack == "not a peer id":
        signer = "not-a-peer-id"
    with pytest.raises(ProtocolError, match=error):
        verify_record(blob, key=key, signer=signer)


def test_sign_refuses_unbounded_ttls() -> None:
    for ttl in (float("nan"), float("inf"), 0, -1, MAX_TTL + 1):
        with pytest.raises(ValueError):
            sign_record(ALICE, ["k"], b"v", ttl=ttl)


def test_later_records_supersede_earlier_ones_even_within_one_clock_tick() -> None:
    first = verify_record(sign_record(ALICE, ["k"], b"1", ttl=30), key="k", signer=A)
    second = verify_record(sign_record(ALICE, ["k"], b"2", ttl=30), key="k", signer=A)
    assert second.issued > first.issued


# ---- the local store -----------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_records_expire_without_scanning() -> None:
    clock = Clock()
    store = LocalRecords(clock=clock)
    for i in range(1000):
        store.put(f"k{i}", "a", b"v", ttl=10 + i)
    store.put("k0", "a", b"v2", ttl=5000, issued=1.0)  # a refresh leaves a stale deadline in the heap
    clock.now += 11.5
    store.expire()
    assert len(store) == 999 and set(store.get("k0")) == {"a"}
    assert store.get("k1") == {}
    clock.now += 10_000
    store.expire()
    assert len(store) == 0 and store.bytes_used == 0 and store.usage("a") == (0, 0)


@pytest.mark.parametrize("ttl", [float("nan"), float("inf"), 0.0, -5.0])
def test_local_records_refuse_unbounded_ttls(ttl) -> None:
    with pytest.raises(ProtocolError, match="ttl"):
        LocalRecords().put("k", "a", b"v", ttl=ttl)


def test_an_older_record_does_not_replace_a_newer_one() -> None:
    store = LocalRecords()
    store.put("k", "a", b"new", ttl=10, issued=200.0)
    with pytest.raises(ProtocolError, match="newer record"):
        store.put("k", "a", b"replayed", ttl=10, issued=100.0)
    assert store.get("k")["a"][0] == b"new"


def test_each_peer_has_a_quota_of_entries_and_bytes() -> None:
    store = LocalRecords(peer_entries=3, peer_bytes=10_000)
    for i in range(3):
        store.put(f"k{i}", "a", b"v", ttl=10)
    with pytest.raises(ProtocolError, match="quota"):
        store.put("k3", "a", b"v", ttl=10)
    store.put("k0", "a", b"refreshed", ttl=10, issued=1.0)  # replacing its own entry is not a new one
    store.put("k3", "b", b"v", ttl=10)  # other peers are unaffected
    with pytest.raises(ProtocolError, match="quota"):
        store.put("big", "b", b"x" * 10_000, ttl=10)


def test_a_full_store_evicts_the_largest_holder_not_the_newcomer() -> None:
    store = LocalRecords(max_entries=10, peer_entries=10)
    for i in range(10):
        store.put(f"flood{i}", "sybil", b"v", ttl=100)
    store.put("m.0", "server", b"record", ttl=10)  # evicts the flooder's oldest entry
    assert store.usage("server")[0] == 1 and store.usage("sybil")[0] == 9
    assert store.get("flood0") == {} and len(store) == 10
    for i in range(4):
        store.put(f"m.{i + 1}", "server", b"record", ttl=10)
    assert store.usage("server")[0] == 5 and store.usage("sybil")[0] == 5
    with pytest.raises(ProtocolError, match="full"):  # a fair share each: neither pushes the other out further
        store.put("m.9", "server", b"record", ttl=10)


def test_many_flooding_identities_push_a_server_down_to_a_fair_share_only() -> None:
    """What quotas cannot stop: enough identities (free to make) squeeze everyone down to one entry each, but never
    out entirely and never below any one flooder; only a private swarm or an allow-list keeps them out."""
    store = LocalRecords(max_entries=50, peer_entries=5)
    for i in range(3):
        store.put(f"m.{i}", "server", b"record", ttl=100)
    for sybil in range(200):
        for i in range(5):
            try:
                store.put(f"spam{i}", f"sybil{sybil}", b"v", ttl=100)
            except ProtocolError:
                pass
    assert len(store) == 50
    assert store.usage("server")[0] >= 1
    assert all(store.usage(f"sybil{n}")[0] <= store.usage("server")[0] for n in range(200))
