"""Verified outputs against a real lying server: a `jupyter-swarm serve` process that returns noise instead of every
20th output it computes (forked by the zygote with ``corrupt_every``, see server_zygote.py)."""

from __future__ import annotations

import pytest
import torch

from jupyter_swarm import AutoDistributedModelForCausalLM
from jupyter_swarm.client.verification import UntrustedServerWarning

CORRUPT_EVERY = 20
NEW_TOKENS = 24  # one prefill + 23 decode steps through the liar: its 20th output (and 40th, next test) is noise
ARGS = ["--torch-threads", "1", "--update-period", "2", "--bandwidth-mbps", "1000", "--balance-period", "0"]


@pytest.fixture(scope="module")
def lying_swarm(zygote, model_path):
    """Two honest servers per half of a 4-block model, and a liar for the second half that announces the highest
    throughput (so routes take it)."""
    path = model_path("llama")
    bootstrap = zygote.fork(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--stop-with-parent"]).wait_ready()
    peers = bootstrap.addrs[:1]
    honest = [zygote.fork_server(path, start, end, [*ARGS, "--throughput", "10", "--initial-peers", *peers])
              for start, end in [(0, 2), (0, 2), (2, 4), (2, 4)]]
    liar = zygote.fork_server(path, 2, 4, [*ARGS, "--throughput", "100", "--initial-peers", *peers],
                              corrupt_every=CORRUPT_EVERY)
    servers = [bootstrap, *honest, liar]
    try:
        for server in servers:
            server.wait_ready()
        yield path, peers, liar
    finally:
        for server in servers:
            server.kill()


@pytest.mark.parametrize("relayed", [True, False], ids=["relayed", "client-driven"])
def test_a_lying_server_is_caught_and_the_tokens_equal_local(lying_swarm, local_model, relayed):
    path, peers, liar = lying_swarm
    prompt = torch.tensor([[1, 17, 42, 99, 7]])
    want = local_model(path).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    corrupted_before = liar.log.read_text().count("corrupting output")
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, verify=1.0,
                                                            wait_for_coverage=30.0)
    try:
        model.swarm.push = relayed
        with pytest.warns(UntrustedServerWarning, match=f"server {liar.peer_id} is not used again"):
            with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
                got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
                assert liar.peer_id not in {r.peer_id for r in session.routes}
        assert liar.log.read_text().count("corrupting output") > corrupted_before  # it did lie, during this run
        assert got.tolist() == want.tolist()
        assert list(model.swarm.bans.distrusted) == [liar.peer_id]  # and no honest server was blamed
        assert "differed from two other servers'" in model.swarm.bans.distrusted[liar.peer_id]
        stats = model.swarm.verifier.stats
        assert stats.mismatches == 1 and stats.checked >= NEW_TOKENS
    finally:
        model.close()
