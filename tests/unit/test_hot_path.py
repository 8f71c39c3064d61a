"""The guarded py-libp2p hot-path patches (p2p/hot_path.py): what each one must keep doing, and the guard."""

import logging
import os

import pytest
import trio
import trio.testing
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from jupyter_swarm.p2p import hot_path
from jupyter_swarm.p2p.hot_path import EagerLock, EagerSemaphore, chosen_patches, patch_hot_path

ECHO = "/jupyter-swarm-test/echo/1.0.0"


async def echo(stream):
    async for payload in stream.frames():
        await stream.send(payload)


@pytest.fixture
def nodes(connected_nodes):
    return connected_nodes(ECHO, echo)


# ---- over real hosts: every patch installed (P2PNode.start() does it) ----------------------------------------------

def test_concurrent_streams_carry_every_frame_intact_with_the_patches(nodes):
    server, client = nodes
    assert all(patch_hot_path().values())  # installed, and installing again changes nothing

    async def exchange(seed: int) -> bool:
        stream = await client.open_stream(server.peer_id, ECHO)
        sizes = [1, 7, 2048, 6150, 70_000, 300_000, 3][seed % 3:]  # frames larger than a yamux frame and window
        payloads = [bytes([seed]) * size + os.urandom(16) for size in sizes]
        try:
            for payload in payloads:
                await stream.send(payload)
                if await stream.recv() != payload:
                    return False
            return True
        finally:
            await stream.close()

    async def many() -> list[bool]:
        results: list[bool] = []

        async def one(seed: int) -> None:
            results.append(await exchange(seed))

        with trio.fail_after(30):  # a lost frame would leave a reader waiting forever
            async with trio.open_nursery() as nursery:
                for seed in range(6):
                    nursery.start_soon(one, seed)
        return results

    assert client.call(many) == [True] * 6


def test_the_stream_objects_of_a_real_connection_use_eager_locks(nodes):
    server, client = nodes

    async def inspect() -> list[str]:
        stream = await client.open_stream(server.peer_id, ECHO)
        try:
            net_stream = stream._stream
            yamux_stream = net_stream.muxed_stream
            muxer = yamux_stream.conn
            tcp = muxer.secured_conn.conn.read_writer.read_write_closer.stream
            locks = [net_stream._state_lock, yamux_stream.window_lock, yamux_stream.close_lock, muxer._write_lock,
                     muxer.streams_lock, tcp.read_lock, tcp.write_lock, yamux_stream.rw_lock._readers_lock]
            return [type(lock).__name__ for lock in locks] + [type(yamux_stream.rw_lock._writer_lock).__name__]
        finally:
            await stream.close()

    assert client.call(inspect) == ["EagerLock"] * 8 + ["EagerSemaphore"]


# ---- the pieces -------------------------------------------------------------------------------------------------

def test_eager_lock_is_exclusive_fair_and_cancellable():
    async def main() -> None:
        lock, order = EagerLock(), []
        await lock.acquire()
        with pytest.raises(RuntimeError):
            await lock.acquire()  # trio's rule: a task cannot take a lock it holds

        async def waiter(name: str) -> None:
            async with lock:
                order.append(name)

        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(waiter, name)
                await trio.testing.wait_all_tasks_blocked()
            assert lock.statistics().tasks_waiting == 3
            lock.release()
        assert order == ["a", "b", "c"] and not lock.locked()

        other_ran = False

        async def other() -> None:
            nonlocal other_ran
            other_ran = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            for _ in range(20):  # a free lock is taken without a scheduler pass (one would let `other` run)
                async with lock:
                    pass
            assert not other_ran
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await lock.acquire()
        assert not lock.locked()

    trio.run(main)


def test_eager_semaphore_may_be_released_by_another_task():
    async def main() -> None:
        semaphore = EagerSemaphore(1)
        await semaphore.acquire()
        assert semaphore.value == 0

        async def release() -> None:
            semaphore.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release)
        async with semaphore:
            assert semaphore.value == 0
        assert semaphore.value == 1

    trio.run(main)


# ---- the guard --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch", list(hot_path.PATCHES))
def test_a_patch_refuses_another_libp2p_version_and_changes_nothing(patch, monkeypatch, caplog):
    monkeypatch.setattr(hot_path, "_libp2p_version", lambda: "0.9.0")
    for cls in (Yamux, YamuxStream, NetStream, TrioTCPStream):  # as if never installed
        for flag in ("_jupyter_swarm_eager_locks",):
            if flag in vars(cls):
                monkeypatch.delattr(cls, flag)
    before = {cls: dict(vars(cls)) for cls in (Yamux, YamuxStream, NetStream, TrioTCPStream)}
    with caplog.at_level(logging.INFO, logger=hot_path.__name__):
        assert hot_path.PATCHES[patch]() is False
    assert {cls: dict(vars(cls)) for cls in before} == before
    assert f"{patch} not installed: written for py-libp2p 0.8.1, found 0.9.0" in caplog.text


def test_the_environment_chooses_the_patches(caplog):
    assert chosen_patches("all") == chosen_patches("") == list(hot_path.PATCHES)
    assert chosen_patches("none") == [] and patch_hot_path("none") == {}
    with caplog.at_level(logging.WARNING, logger=hot_path.__name__):
        assert chosen_patches("eager_locks, no_such_patch") == ["eager_locks"]
    assert "unknown patch 'no_such_patch'" in caplog.text
