"""Per-peer limits on real servers, and idle sessions evicted under memory pressure: the evicted client replays
and its tokens are still the local model's."""

from __future__ import annotations

import time

import pytest
import torch

from jupyter_swarm.client.swarm import join_swarm
from jupyter_swarm.errors import PeerUnavailableError, RemoteError
from jupyter_swarm.wire.inference import Open, Opened
from jupyter_swarm.wire.messages import decode
from jupyter_swarm.wire.protocols import INFERENCE, RPC, RPC_STREAMS
from jupyter_swarm.wire.rpc import Info, InfoResult
from tests.integration.conftest import start_swarm

PROMPT = torch.tensor([[1, 17, 42, 99, 7]])
# 1 MiB of cache per server holds 2048 tokens of a 2-block span of the test model (512 bytes per token): one long
# prompt's session fits, a second one only once the first is evicted
LIMITS = ["--cache-mib", "1", "--limit", "cache_share_per_peer=0.75", "--limit", "evict_idle_after=0.5",
          "--limit", "sessions_per_peer=3"]


def _long_prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 500, (1, length), generator=torch.Generator().manual_seed(seed))  # no special tokens


@pytest.fixture(scope="module")
def swarm(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)], extra_args=LIMITS) as swarm:
        yield path, swarm


def test_an_idle_session_evicted_for_another_replays_and_keeps_the_local_tokens(swarm, connect, local_model):
    path, local_swarm = swarm
    model, other = connect(path, local_swarm), connect(path, local_swarm)
    local = local_model(path)
    with model.inference_session(max_length=1100) as session:
        first = model.generate(_long_prompt(1000, 0), max_new_tokens=4, do_sample=False)  # ~half of each cache
        assert session._push_ready  # relayed from server to server
        time.sleep(1.0)  # idle for longer than evict_idle_after
        with other.inference_session(max_length=1300):  # its 1200 tokens fit only if the idle session goes
            other_tokens = other.generate(_long_prompt(1200, 1), max_new_tokens=4, do_sample=False)
        second = model.generate(torch.tensor([[21, 22]]), max_new_tokens=4, do_sample=False)
        assert session.failovers >= 1  # the eviction was noticed and the session replayed ...
        assert not model.swarm.bans.banned()  # ... without banning the servers, which are fine
    assert other_tokens.tolist() == local.generate(_long_prompt(1200, 1), max_new_tokens=4, do_sample=False).tolist()
    expected = local.generate(torch.cat([first, torch.tensor([[21, 22]])], 1), max_new_tokens=4, do_sample=False)
    assert torch.cat([first, second], 1).tolist() == expected.tolist()


def test_one_peer_gets_clear_refusals_past_its_limits_and_others_are_served(swarm, connect, local_model):
    path, local_swarm = swarm
    server = local_swarm.servers[0].peer_id
    node = join_swarm(local_swarm.initial_peers)

    async def open_session(max_length: int):
        stream = await node.open_stream(server, INFERENCE)
        await stream.send(Open(max_length, 1).encode())
        return stream, await stream.recv()

    async def attack():
        sessions = [await open_session(8) for _ in range(3)]
        assert all(isinstance(decode(reply, Opened), Opened) for _, reply in sessions)
        _, refused = await open_session(8)  # a fourth session from the same peer
        with pytest.raises(RemoteError, match="already holds 3 inference sessions"):
            decode(refused, Opened)
        for stream, _ in sessions:
            await stream.close()
        _, too_big = await open_session(2000)  # declares 1000 KiB: over the 768 KiB one peer's sessions may
        with pytest.raises(RemoteError, match="one peer may use"):
            decode(too_big, Opened)
        # streams past the RPC quota are reset before the server reads them; the ones within it are served
        streams = [await node.open_stream(server, RPC) for _ in range(RPC_STREAMS.per_peer + 4)]
        answers = []
        for stream in streams:
            try:
                await stream.send(Info().encode())
                answers.append(decode(await stream.recv(), InfoResult))
            except PeerUnavailableError:
                answers.append(None)
        for stream in streams:
            await stream.close()
        return answers

    try:
        answers = node.call(attack)
    finally:
        node.shutdown()
    assert sum(a is not None for a in answers) == RPC_STREAMS.per_peer
    assert all(a.start == 0 and a.end == 2 for a in answers if a is not None)
    model = connect(path, local_swarm)  # another peer is served as usual
    got = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert got.tolist() == local_model(path).generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()
    assert all(s.process.poll() is None for s in local_swarm.servers)
