"""Quant types in the swarm: the server's choice and memory sizing, records, routing by allowed quant types, the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from jupyter_swarm.cli import main
from jupyter_swarm.client.routing import choose_chain, choose_forward_chain, explain_missing, unsuitable_servers
from jupyter_swarm.client.swarm import _quant_type_names
from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.swarm_map import SwarmMap, decode_record, encode_record
from jupyter_swarm.errors import ConfigurationError, MissingBlocksError
from jupyter_swarm.models import BlockSpan, make_tiny_model
from jupyter_swarm.models.quantization import QuantType
from jupyter_swarm.runtime.server import BlockServer, ServerConfig, block_bytes, choose_quant_type

MIB = 2**20


def rec(peer: str, start: int, end: int, quant_type: str = "none", adapters: tuple[str, ...] = ()) -> ServerRecord:
    return ServerRecord(peer_id=peer, addrs=[], start=start, end=end, state=ServerState.ONLINE, inference_rps=1000.0,
                        quant_type=quant_type, adapters=list(adapters), cache_tokens_left=10**6)


def smap(*records: ServerRecord, num_blocks: int = 8) -> SwarmMap:
    return SwarmMap("m", num_blocks, {r.peer_id: r for r in records})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("quant-units") / "llama"), hidden_size=128, num_layers=16)


def test_records_carry_the_quant_type_and_nonsense_is_ignored(caplog):
    record = rec("a", 0, 4, quant_type="nf4")
    assert decode_record(encode_record(record), num_blocks=8).quant_type == "nf4"
    assert ServerRecord.from_wire({k: v for k, v in record.to_wire().items() if k != "quant_type"}).quant_type == "none"
    for bad in (4, "", "x" * 33, None):
        assert ServerRecord.from_wire({**record.to_wire(), "quant_type": bad}, num_blocks=8) is None
    assert "quant_type must be a name" in caplog.text


def test_routes_use_only_allowed_quant_types():
    swarm = smap(rec("int8", 0, 8, "int8"), rec("nf4-lo", 0, 4, "nf4"), rec("nf4-hi", 4, 8, "nf4"),
                 rec("float", 0, 8, "none", adapters=("x",)))
    assert unsuitable_servers(swarm) == set()
    blocked = unsuitable_servers(swarm, allowed_quant_types={"nf4"})
    assert blocked == {"int8", "float"}
    assert [r.peer_id for r in choose_chain(swarm, 0, 8, blocked=blocked)] == ["nf4-lo", "nf4-hi"]
    assert {r.peer_id for r in choose_forward_chain(swarm, 0, 8, blocked=blocked)} == {"nf4-lo", "nf4-hi"}
    both = unsuitable_servers(swarm, allowed_quant_types={"none", "int8"})
    assert [r.peer_id for r in choose_chain(swarm, 0, 8, blocked=both)] in (["int8"], ["float"])
    assert unsuitable_servers(swarm, active_adapter="x", allowed_quant_types={"none", "nf4"}) == {"int8", "nf4-lo",
                                                                                                  "nf4-hi"}


def test_missing_blocks_name_the_quant_types_that_do_serve_them():
    swarm = smap(rec("a", 0, 8, "int8"), rec("b", 0, 4, "nf4"))
    blocked = unsuitable_servers(swarm, allowed_quant_types={"nf4"})
    with pytest.raises(MissingBlocksError) as info:
        choose_chain(swarm, 0, 8, blocked=blocked)
    explained = explain_missing(info.value, swarm, {"nf4"})
    assert explained.missing == [4, 5, 6, 7]
    assert ("no online server of quant type nf4 covers blocks 4-7; servers of quant type int8 do: add them to "
            "allowed_quant_types") in str(explained)
    assert explain_missing(info.value, swarm, None) is info.value
    truly_missing = MissingBlocksError([9], 2)  # nobody serves it: the plain message stays
    assert explain_missing(truly_missing, smap(rec("a", 0, 8, "int8"), num_blocks=10), {"nf4"}) is truly_missing


def test_allowed_quant_types_are_checked():
    assert _quant_type_names(None) is None
    assert _quant_type_names(["NF4", "int8"]) == {"nf4", "int8"}
    with pytest.raises(ConfigurationError, match="unknown quant type 'q4'; choose one of none, int8, nf4, fp4"):
        _quant_type_names(["nf4", "q4"])
    with pytest.raises(ConfigurationError, match="not one string"):
        _quant_type_names("nf4")
    with pytest.raises(ConfigurationError, match="is empty"):
        _quant_type_names([])


def test_auto_quant_type_quantizes_a_gpu_only_as_far_as_the_span_needs():
    span = {QuantType.NONE: 16 * MIB, QuantType.INT8: 4 * MIB, QuantType.NF4: 2 * MIB}
    assert choose_quant_type("auto", device="cpu", span_bytes=span, usable_bytes=MIB) == QuantType.NONE
    assert choose_quant_type("auto", device="cuda", span_bytes=span, usable_bytes=20 * MIB) == QuantType.NONE
    assert choose_quant_type("auto", device="cuda:0", span_bytes=span, usable_bytes=10 * MIB) == QuantType.INT8
    assert choose_quant_type("auto", device="cuda:0", span_bytes=span, usable_bytes=3 * MIB) == QuantType.NF4
    assert choose_quant_type("auto", device="cuda:0", span_bytes=span, usable_bytes=MIB) == QuantType.NF4  # fewer blocks
    assert choose_quant_type("int8", device="cpu", span_bytes=span, usable_bytes=0) == QuantType.INT8
    with pytest.raises(ConfigurationError, match="unknown quant type 'int3'"):
        choose_quant_type("int3", device="cpu", span_bytes=span, usable_bytes=0)


def test_memory_sizing_counts_quantized_bytes(model):
    sizes = {}
    for quant_type in ("none", "int8", "nf4"):
        server = BlockServer(ServerConfig(model, quant_type=quant_type, memory_bytes=8 * MIB, cache_bytes=6 * MIB))
        server.prepare()
        assert server.quant_type == QuantType(quant_type)
        sizes[quant_type] = server.span_length()
        weights = block_bytes(server.model_config, torch.float32, server.quant_type)
        assert sizes[quant_type] == min(16, 2 * MIB // weights)
    assert sizes["none"] < sizes["int8"] < sizes["nf4"]
    assert block_bytes(server.model_config, torch.float32, QuantType.NF4) < 0.2 * block_bytes(server.model_config,
                                                                                               torch.float32)
    tight = BlockServer(ServerConfig(model, quant_type="none", memory_bytes=6 * MIB + 1000, cache_bytes=6 * MIB))
    tight.prepare()
    with pytest.raises(ConfigurationError, match=r"not enough memory for one block.*--quant-type nf4"):
        tight.span_length()


def test_throughput_is_cached_per_quant_type(model, tmp_path, monkeypatch):
    from jupyter_swarm.runtime import throughput

    monkeypatch.setenv(throughput.CACHE_ENV, str(tmp_path / "throughput.json"))
    measured = []
    monkeypatch.setattr(throughput, "measure_compute",
                        lambda span, **options: measured.append(span.quant_type) or (1.0, 2.0))
    for quant_type in ("none", "nf4", "none", "nf4", "int8"):
        throughput.get_throughput(BlockSpan.load(model, 0, 1, quant_type=quant_type))
    assert measured == [QuantType.NONE, QuantType.NF4, QuantType.INT8]
    keys = [json.loads(key) for key in json.loads((tmp_path / "throughput.json").read_text())]
    assert sorted(key[2] for key in keys) == ["int8", "nf4", "none"]


def test_the_quant_type_choices_users_see_are_the_quant_types_plus_auto():
    from jupyter_swarm.models.quantization import QUANT_TYPE_NAMES
    from jupyter_swarm.options import QUANT_TYPES

    assert QUANT_TYPES == ("auto", *QUANT_TYPE_NAMES)


def test_cli_refuses_an_unknown_quant_type(model, capsys):
    with pytest.raises(SystemExit):
        main(["serve", model, "--new-swarm", "--quant-type", "int4"])
    error = capsys.readouterr().err
    assert "--quant-type: invalid choice: 'int4'" in error and "'none', 'int8', 'nf4', 'fp4'" in error


def test_cli_without_bitsandbytes_says_how_to_install_it(model, capsys, monkeypatch):
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    assert main(["serve", model, "--new-swarm", "--quant-type", "nf4"]) == 2
    error = capsys.readouterr().err
    assert "jupyter-swarm serve: error: quant type nf4 needs bitsandbytes, which is not installed" in error
    assert 'pip install "bitsandbytes' in error


def test_cli_refuses_a_device_this_machine_does_not_have(model, capsys):
    assert main(["serve", model, "--new-swarm", "--device", "cuda:99"]) == 2
    assert "jupyter-swarm serve: error: device 'cuda:99' is not usable on this machine" in capsys.readouterr().err
