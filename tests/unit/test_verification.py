"""The verifier's decisions (client/verification.py) against a fake swarm whose servers answer forwards from a table.

tests/integration/test_verification.py runs it against a real lying server process."""

from __future__ import annotations

import warnings

import pytest
import torch
import trio

from jupyter_swarm.client.routing import BanList, SpanRoute
from jupyter_swarm.client.verification import (OutputVerifier, UntrustedServerWarning, WrongOutputError,
                                               check_finite, parse_probability, relative_error, tolerance)
from jupyter_swarm.dht.records import ServerRecord, ServerState
from jupyter_swarm.dht.swarm_map import SwarmMap
from jupyter_swarm.errors import ConfigurationError, PeerUnavailableError
from jupyter_swarm.wire.rpc import ForwardResult
from jupyter_swarm.wire.tensor_fields import WireTensor
from jupyter_swarm.wire.tensors import Compression

TRUTH = torch.randn(1, 5, 8)  # what an honest server answers for the span's inputs
WRONG = TRUTH + torch.randn(1, 5, 8)


class FakeSwarm:
    """What OutputVerifier uses of a SwarmClient; ``answers``: peer id -> its forward output (or an exception)."""

    def __init__(self, answers: dict[str, torch.Tensor | Exception], dtypes: dict[str, str] | None = None):
        self.answers = answers
        self.bans = BanList()
        self.active_adapter = None
        self.asked: list[str] = []
        self.map = SwarmMap("m", 4, {p: ServerRecord(p, [], 0, 4, ServerState.ONLINE,
                                                     dtype=(dtypes or {}).get(p, "float32"))
                                     for p in ["primary", *answers]})

    async def swarm_map(self) -> SwarmMap:
        return self.map

    def route_lists(self, swarm_map: SwarmMap) -> dict:
        return dict(banned=self.bans.banned(), allowed=None, blocked=set())

    async def rpc(self, peer_id: str, request, reply_kind, **context) -> ForwardResult:
        self.asked.append(peer_id)
        answer = self.answers[peer_id]
        if isinstance(answer, Exception):
            raise answer
        assert request.start == 1 and request.end == 3 and context["shape"] == tuple(request.hidden.shape)
        return ForwardResult(WireTensor.encode(answer))


def check(swarm: FakeSwarm, primary_output: torch.Tensor, warned: list[str] | None = None) -> OutputVerifier:
    """Check the primary's output for one step; the warnings the user saw go to ``warned``."""
    verifier = OutputVerifier(swarm, 1.0, seed=0)  # type: ignore[arg-type]
    verifier._rng.shuffle = lambda peers: peers.sort()  # type: ignore[method-assign] # ask servers by name order
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trio.run(verifier.check, SpanRoute("primary", 1, 3), torch.zeros(1, 5, 8), primary_output[:, -1:],
                     Compression.NONE)
        finally:  # (other warnings, e.g. a library's deprecation on first use, are not the verifier's)
            if warned is not None:
                warned.extend(str(w.message) for w in caught if issubclass(w.category, UntrustedServerWarning))
    return verifier


def test_agreeing_servers_pass() -> None:
    swarm = FakeSwarm({"a": TRUTH + 1e-6, "b": TRUTH})
    warned: list[str] = []
    verifier = check(swarm, TRUTH, warned)
    assert swarm.asked == ["a"] and not swarm.bans.distrusted and not warned
    assert (verifier.stats.checked, verifier.stats.mismatches, verifier.stats.skipped) == (1, 0, 0)


def test_a_wrong_primary_is_distrusted_by_two_servers() -> None:
    swarm = FakeSwarm({"a": TRUTH, "b": TRUTH})
    warned: list[str] = []
    with pytest.raises(WrongOutputError, match="server primary returned a wrong output") as e:
        check(swarm, WRONG, warned)
    assert e.value.peer_id == "primary" and swarm.asked == ["a", "b"]
    assert list(swarm.bans.distrusted) == ["primary"] and "primary" in swarm.bans.banned()
    assert len(warned) == 1 and warned[0].startswith("server primary is not used again by this client: its output "
                                                     "for blocks 1:3 differed from two other servers'")


def test_a_wrong_verifier_is_distrusted_and_the_primary_kept() -> None:
    swarm = FakeSwarm({"a-liar": WRONG, "b-honest": TRUTH})
    warned: list[str] = []
    verifier = check(swarm, TRUTH, warned)
    assert list(swarm.bans.distrusted) == ["a-liar"] and len(warned) == 1 and verifier.stats.mismatches == 1


def test_without_a_referee_both_are_distrusted() -> None:
    swarm = FakeSwarm({"other": TRUTH})
    warned: list[str] = []
    with pytest.raises(WrongOutputError):
        check(swarm, WRONG, warned)
    assert set(swarm.bans.distrusted) == {"primary", "other"} and len(warned) == 2


def test_no_second_server_or_a_failing_one_skips_the_check() -> None:
    for answers in ({}, {"gone": PeerUnavailableError("down")}):
        swarm = FakeSwarm(answers)
        verifier = check(swarm, WRONG)
        assert (verifier.stats.checked, verifier.stats.skipped) == (0, 1) and not swarm.bans.distrusted


def test_only_servers_of_the_same_dtype_verify() -> None:
    swarm = FakeSwarm({"half": WRONG}, dtypes={"half": "bfloat16"})
    verifier = check(swarm, TRUTH)
    assert swarm.asked == [] and verifier.stats.skipped == 1


def test_probability_zero_never_checks_and_one_always() -> None:
    assert not any(OutputVerifier(None, 0.0).should_check() for _ in range(100))  # type: ignore[arg-type]
    assert all(OutputVerifier(None, 1.0).should_check() for _ in range(100))  # type: ignore[arg-type]
    verifier = OutputVerifier(None, 0.25, seed=1)  # type: ignore[arg-type]
    share = sum(verifier.should_check() for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3


def test_parse_probability() -> None:
    assert (parse_probability(True), parse_probability(False), parse_probability(None)) == (1.0, 0.0, 0.0)
    assert parse_probability("0.05") == 0.05
    for bad in (1.5, -0.1, "often"):
        with pytest.raises(ConfigurationError, match="verify must be a probability between 0 and 1"):
            parse_probability(bad)


def test_tolerance_separates_honest_rounding_from_wrong_outputs() -> None:
    hidden = torch.randn(2, 7, 64) * 3
    assert relative_error(hidden.to(torch.bfloat16).float(), hidden) < tolerance("bfloat16", Compression.NONE)
    assert relative_error(hidden.half().float(), hidden) < tolerance("float32", Compression.FLOAT16)
    assert relative_error(hidden + 1e-4 * torch.randn_like(hidden), hidden) < tolerance("float32", Compression.NONE)
    noise = torch.randn_like(hidden) * hidden.std() + hidden.mean()  # what the lying test server returns
    for dtype in ("float32", "float16", "bfloat16"):
        for compression in Compression:
            assert relative_error(noise, hidden) > 10 * tolerance(dtype, compression)
    one_token_wrong = hidden.clone()
    one_token_wrong[1, 3] *= -1
    assert relative_error(one_token_wrong, hidden) > 1.0  # the worst token counts, not the average
    assert relative_error(torch.full_like(hidden, float("nan")), hidden) == float("inf")


def test_check_finite_names_the_server() -> None:
    check_finite("p", [torch.zeros(2), torch.ones(3, dtype=torch.int64)], "an output")
    with pytest.raises(WrongOutputError, match="server p returned carried inputs with NaN or infinite values"):
        check_finite("p", [torch.zeros(2), torch.tensor([1.0, float("inf")])], "carried inputs")
