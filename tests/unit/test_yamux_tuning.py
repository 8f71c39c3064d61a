"""Batched yamux receive credit (p2p/yamux_tuning.py), between two real libp2p hosts on loopback."""

import pytest
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream

from jupyter_swarm.p2p.yamux_tuning import tune_yamux

ECHO = "/jupyter-swarm-test/echo-size/1.0.0"


async def answer_with_sizes(stream):
    async for payload in stream.frames():
        await stream.send(len(payload).to_bytes(8, "big"))


@pytest.fixture
def credit_updates(monkeypatch):
    """(peer, increment) of every WINDOW_UPDATE frame any stream in this process sends."""
    sent = []
    original = YamuxStream.send_window_update

    async def counted(self, increment, *args, **kwargs):
        sent.append(increment)
        return await original(self, increment, *args, **kwargs)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    return sent


@pytest.fixture
def nodes(connected_nodes):
    return connected_nodes(ECHO, answer_with_sizes)


def test_small_messages_return_credit_once_per_half_window_and_bulk_transfers_still_flow(nodes, credit_updates):
    server, client = nodes
    assert getattr(YamuxStream, "_jupyter_swarm_batched", False)  # P2PNode.start() installs it
    assert tune_yamux()  # and installing it again changes nothing
    small, count = 2048, 40  # 80 KiB each way, under half of the 256 KiB window: no credit frame is needed yet

    async def exchange(sizes):
        stream = await client.open_stream(server.peer_id, ECHO)
        answers = []
        for size in sizes:
            await stream.send(b"x" * size)
            answers.append(int.from_bytes(await stream.recv(), "big"))
        await stream.close()
        return answers

    assert client.call(exchange, [small] * count) == [small] * count
    assert credit_updates == []  # py-libp2p alone sends one after most reads: about one per round trip
    big = 4 * DEFAULT_WINDOW_SIZE  # 1 MiB: the sender needs credit back three times to finish
    assert client.call(exchange, [big, small]) == [big, small]
    assert 1 <= len(credit_updates) and sum(credit_updates) >= big - DEFAULT_WINDOW_SIZE
