"""BlockServer.status(): the public picture of a server that displays read instead of its private fields."""

from __future__ import annotations

import logging

import torch

from jupyter_swarm.client.model import AutoDistributedModelForCausalLM
from jupyter_swarm.models import make_tiny_model
from jupyter_swarm.runtime.server import BlockServer, ServerConfig
from jupyter_swarm.runtime.server_status import STARTING_STAGES


def test_status_follows_a_server_from_start_to_stop(tmp_path, caplog) -> None:
    path = make_tiny_model(str(tmp_path / "tiny"), num_layers=2)
    server = BlockServer(ServerConfig(path, 0, 2, throughput=5.0, cache_bytes=2**20))
    before = server.status()
    assert (before.stage, before.step, before.peer_id, before.requests) == (STARTING_STAGES[0], 0, None, 0)
    with caplog.at_level(logging.INFO, logger="jupyter_swarm.runtime.server"):
        server.start()
    try:
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith(STARTING_STAGES)]
        assert [m.split(" ")[0] for m in logged] == [s.split(" ")[0] for s in STARTING_STAGES]  # each, at INFO
        assert logged[1] == "choosing blocks: 0:2, as given" and logged[2].startswith("loading weights 0:2 of ")
        status = server.status()
        assert (status.stage, status.step, status.start_block, status.end_block) == ("serving", 4, 0, 2)
        assert status.peer_id == server.peer_id and status.addrs == server.addrs
        assert status.throughput == 5.0 and status.dtype == "float32" and status.quant_type == "none"
        assert status.weights_bytes == sum(p.numel() * 4 for p in server.span.parameters())
        assert (status.cache_used_bytes, status.cache_total_bytes) == (0, 2**20)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=server.addrs)
        try:
            with torch.no_grad():
                model(torch.tensor([[1, 5, 9]]))
            model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
        finally:
            model.close()
        served = server.status()
        assert served.forward_requests == 1 and served.inference_steps == 3 and served.sessions_opened == 1
        assert served.requests == 4 and served.to_dict()["requests"] == 4
    finally:
        server.stop()
    stopped = server.status()
    assert (stopped.stage, stopped.peer_id) == ("stopped", None)
