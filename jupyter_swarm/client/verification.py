"""Verified outputs: now and then the client re-runs a span's step on a second server and compares the two.

A server that returns wrong hidden states (a bug, bad memory, a tampered binary) would otherwise go unnoticed:
the tokens just come out wrong. With probability ``probability`` per span and step, the client sends the span's
whole input so far (its replay history plus this step) to another server holding the same blocks in the same
dtype and quant type, as one stateless forward request, and compares the last positions of that answer with the
output it got, within a tolerance that fits the dtype and the wire compression. When the two differ, a third such
server (the referee) decides which one was wrong; with no referee, neither can be trusted. A server found wrong is
banned for the rest of this client's life and reported (an :class:`UntrustedServerWarning`, a log line, and
``swarm.bans.distrusted``); the session then routes around it as after a failure.

What it costs: a verified step is one forward over the span's whole history on another server (cheap for a
decode step's span of a tiny model; for long sessions of big models, as much as that span's prefill). The client
never waits on a verifier that fails: such a check is skipped (and counted), the generation goes on.
What it cannot do: an unverified step's wrong output is used as is, so a server that lies on a fraction f of its
steps slips ``f * (1 - p)`` of them through; ``verify=1.0`` checks every step (about twice the servers' work).
In a relayed step a span's output reaches the client through the servers after it; a mismatch is blamed on the
span that computed it.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jupyter_swarm.client.routing import SpanRoute, usable_servers
from jupyter_swarm.dht.records import ServerRecord
from jupyter_swarm.dht.swarm_map import SwarmMap
from jupyter_swarm.errors import ConfigurationError, PeerUnavailableError, ProtocolError, RemoteError
from jupyter_swarm.wire.protocols import MAX_BATCH_TOKENS
from jupyter_swarm.wire.rpc import Forward, ForwardResult
from jupyter_swarm.wire.tensor_fields import WireTensor
from jupyter_swarm.wire.tensors import Compression

if TYPE_CHECKING:
    from jupyter_swarm.client.swarm import SwarmClient

logger = logging.getLogger(__name__)

DEFAULT_PROBABILITY = 0.01
# Relative error (L2 per token) two honest servers stay within: an incremental step against a forward over the
# whole prefix, possibly on other hardware (TF32 matmuls on GPUs reach ~1e-3 in float32).
DTYPE_TOLERANCE = {"float32": 5e-3, "float64": 5e-3, "float16": 2e-2, "bfloat16": 5e-2}
# The error one trip through the wire's compression adds (both answers went through it).
COMPRESSION_TOLERANCE = {Compression.NONE: 0.0, Compression.FLOAT16: 2e-3, Compression.BFLOAT16: 1.6e-2,
                         Compression.BLOCKWISE_8BIT: 4e-2}


class WrongOutputError(ProtocolError):
    """A server's output failed the client's checks: not finite, or unlike what other servers compute."""

    def __init__(self, peer_id: str, message: str):
        super().__init__(message)
        self.peer_id = peer_id


class UntrustedServerWarning(UserWarning):
    """A server returned wrong outputs; this client will not use it again."""


@dataclass
class VerificationStats:
    """What the verifier did so far (for the user, tests and benchmarks)."""

    checked: int = 0  # span steps compared with a second server
    skipped: int = 0  # picked for a check but no second server could answer (no such server, or it failed)
    mismatches: int = 0


def tolerance(dtype: str, compression: Compression) -> float:
    """How far (relative L2 error per token) two honest answers may be apart."""
    return DTYPE_TOLERANCE.get(dtype, DTYPE_TOLERANCE["bfloat16"]) + 2 * COMPRESSION_TOLERANCE[compression]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest relative L2 error of a token's hidden state (rows of the last dimension); inf if not finite."""
    got, want = got.float(), want.float()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    diff = torch.linalg.vector_norm(got - want, dim=-1)
    scale = torch.linalg.vector_norm(want, dim=-1).clamp_min(1e-6)
    return float((diff / scale).max()) if diff.numel() else 0.0


def check_finite(peer_id: str, tensors: list[torch.Tensor], what: str) -> None:
    """Raise WrongOutputError if any of a server's ``tensors`` holds NaN or infinities."""
    for tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WrongOutputError(peer_id, f"server {peer_id} returned {what} with NaN or infinite values")


def parse_probability(verify: float | bool | None) -> float:
    """``verify=`` as a probability per step: a number in [0, 1], True (every step) or False/None (never)."""
    if verify is None or verify is False:
        return 0.0
    if verify is True:
        return 1.0
    try:
        p = float(verify)
    except (TypeError, ValueError):
        raise ConfigurationError(f"verify must be a probability between 0 and 1, got {verify!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ConfigurationError(f"verify must be a probability between 0 and 1 (the share of steps re-run on a "
                                 f"second server), got {verify!r}")
    return p


class OutputVerifier:
    """Re-runs a random share of span steps on second servers (see the module docstring)."""

    def __init__(self, swarm: "SwarmClient", probability: float = DEFAULT_PROBABILITY, seed: int | None = None):
        self.swarm = swarm
        self.probability = parse_probability(probability)
        self.stats = VerificationStats()
        self._rng = random.Random(seed)

    def should_check(self) -> bool:
        """Whether to check the step about to be taken (a coin flip of ``probability``)."""
        return self.probability > 0 and (self.probability >= 1 or self._rng.random() < self.probability)

    async def check(self, route: SpanRoute, inputs: torch.Tensor, output: torch.Tensor,
                    compression: Compression) -> None:
        """Compare ``output`` (the last positions of ``route``'s answer for ``inputs``, the span's whole input so
        far) with another server's; raise WrongOutputError if ``route``'s server was wrong."""
        if inputs.shape[0] * inputs.shape[1] > MAX_BATCH_TOKENS:
            self.stats.skipped += 1
            return
        swarm_map = await self.swarm.swarm_map()
        primary = swarm_map.servers.get(route.peer_id)
        if primary is None:
            self.stats.skipped += 1
            return
        peers = self._peers_like(swarm_map, primary, route)
        tol = tolerance(primary.dtype, compression)
        second = await self._answer(peers, route, inputs, output.shape[1], compression)
        if second is None:
            self.stats.skipped += 1
            return
        verifier, expected = second
        self.stats.checked += 1
        error = relative_error(output, expected)
        if error <= tol:
            return
        self.stats.mismatches += 1
        third = await self._answer([p for p in peers if p != verifier], route, inputs, output.shape[1], compression)
        if third is not None and relative_error(output, third[1]) <= tol:
            self.distrust(verifier, f"its output for blocks {route.start}:{route.end} differed from two other "
                                    f"servers' (relative error {relative_error(third[1], expected):.3g})")
            return
        if third is None or relative_error(third[1], expected) > tol:  # nobody can tell which one is right
            self.distrust(verifier, f"its output for blocks {route.start}:{route.end} differed from server "
                                    f"{route.peer_id}'s and no third server agreed with it")
        why = (f"its output for blocks {route.start}:{route.end} differed from "
               f"{'two other servers' if third is not None else f'server {verifier}'}'s "
               f"(relative error {error:.3g}, tolerance {tol:.3g})")
        self.distrust(route.peer_id, why)
        raise WrongOutputError(route.peer_id, f"server {route.peer_id} returned a wrong output: {why}")

    def _peers_like(self, swarm_map: SwarmMap, primary: ServerRecord, route: SpanRoute) -> list[str]:
        """Other usable servers holding ``route``'s blocks in the primary's dtype and quant type, in random order."""
        peers = [s.peer_id for s in usable_servers(swarm_map, **self.swarm.route_lists(swarm_map))
                 if s.start <= route.start and route.end <= s.end and s.peer_id != primary.peer_id
                 and s.dtype == primary.dtype and s.quant_type == primary.quant_type]
        self._rng.shuffle(peers)
        return peers

    async def _answer(self, peers: list[str], route: SpanRoute, inputs: torch.Tensor, new_tokens: int,
                      compression: Compression) -> tuple[str, torch.Tensor] | None:
        """The last ``new_tokens`` positions of the first of ``peers`` that answers a forward of ``inputs``."""
        request = Forward(WireTensor.encode(inputs, compression), route.start, route.end, compression,
                          self.swarm.active_adapter)
        for peer in peers[:2]:
            try:
                reply = await self.swarm.rpc(peer, request, ForwardResult, shape=tuple(inputs.shape))
                return peer, reply.hidden.decode().to(inputs.dtype)[:, -new_tokens:]
            except (PeerUnavailableError, RemoteError, ProtocolError) as e:
                logger.debug("server %s could not verify blocks %d:%d: %s", peer, route.start, route.end, e)
        return None

    def distrust(self, peer_id: str, why: str) -> None:
        """Ban ``peer_id`` for the rest of this client's life and tell the user."""
        if peer_id in self.swarm.bans.distrusted:
            return
        self.swarm.bans.distrust(peer_id, why)
        message = f"server {peer_id} is not used again by this client: {why}"
        logger.warning(message)
        warnings.warn(message, UntrustedServerWarning, stacklevel=2)
