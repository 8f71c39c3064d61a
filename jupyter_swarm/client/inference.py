"""Client side of an inference session, with the dual cache that makes it survive server failures.

Each server keeps the attention cache of its span; the client keeps every input it sent to each span.
When a server fails, the client bans it, finds a replacement chain for that span, replays the inputs
to rebuild the cache there, and carries on: the generated tokens are the same as without the failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from jupyter_swarm.client.routing import SpanRoute
from jupyter_swarm.client.swarm import SwarmClient
from jupyter_swarm.errors import ConfigurationError, PeerUnavailableError, RemoteError, SwarmError
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.wire.messages import field as message_field
from jupyter_swarm.wire.messages import pack, unpack
from jupyter_swarm.wire.protocols import INFERENCE
from jupyter_swarm.wire.tensors import Compression, decode_tensor, encode_tensor

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 8


class SessionLengthError(ConfigurationError):
    """More tokens were sent than the session's max_length allows."""


class SessionClosedError(SwarmError):
    """The inference session was closed and cannot take more steps."""


@dataclass
class _SpanSession:
    """One server's part of the session and the inputs the client sent it (for replay)."""

    route: SpanRoute
    stream: FramedStream
    history: list[torch.Tensor] = field(default_factory=list)

    def inputs(self) -> torch.Tensor | None:
        if not self.history:
            return None
        if len(self.history) > 1:
            self.history = [torch.cat(self.history, dim=1)]
        return self.history[0]


class InferenceSession:
    """A generation session over a chain of servers; steps feed new tokens' hidden states through it."""

    def __init__(self, swarm: SwarmClient, *, max_length: int, compression: Compression = Compression.NONE,
                 step_timeout: float = 180.0):
        self.swarm = swarm
        self.max_length = max_length
        self.compression = compression
        self.step_timeout = step_timeout
        self.position = 0
        self.batch_size: int | None = None
        self.failovers = 0
        self._spans: list[_SpanSession] = []
        self._closed = False
        self.last_step_routes: list[SpanRoute] = []

    @property
    def routes(self) -> list[SpanRoute]:
        """The chain of servers the session currently uses."""
        return [s.route for s in self._spans]

    # ---- public synchronous API --------------------------------------------------------------------
    def step(self, hidden: torch.Tensor, *, beam_idx: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Send the new tokens' hidden states [batch, n, hidden] through every block; returns the last block's output."""
        return self.swarm.node.call(self.astep, hidden, beam_idx, prompts)

    def close(self) -> None:
        """Close the session on every server (frees their caches)."""
        if not self._closed and self.swarm.node.running:
            self.swarm.node.call(self.aclose)
        self._closed = True

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- trio side ----------------------------------------------------------------------------------
    async def astep(self, hidden: torch.Tensor, beam_idx: torch.Tensor | None = None,
                    prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Async twin of :meth:`step` (runs on the libp2p thread)."""
        if self._closed:
            raise SessionClosedError("this inference session is closed; open a new one with model.inference_session()")
        batch, new_tokens = hidden.shape[0], hidden.shape[1]
        if self.batch_size is None:
            self.batch_size = batch
        elif batch != self.batch_size:
            raise ConfigurationError(f"this session was started with batch size {self.batch_size}, got {batch}")
        if self.position + new_tokens > self.max_length:
            raise SessionLengthError(
                f"session max_length is {self.max_length} tokens: {self.position} used + {new_tokens} new is too many; "
                "open the session with a larger max_length")
        if not self._spans:
            await self._open_chain(0, self.swarm.num_blocks, insert_at=0)
        if beam_idx is not None:
            for span in self._spans:
                inputs = span.inputs()
                if inputs is not None:
                    span.history = [inputs.index_select(0, beam_idx)]
        index = 0
        while index < len(self._spans):
            span = self._spans[index]
            span_prompts = None if prompts is None else prompts[span.route.start:span.route.end]
            try:
                out = await self._send_step(span, hidden, beam_idx, span_prompts)
            except (PeerUnavailableError, RemoteError) as e:
                if isinstance(e, RemoteError) and e.invalid_request:
                    raise
                await self._replace(index, e)
                continue  # retry this step on the replacement span(s), starting at the same index
            span.history.append(hidden)
            self.swarm.bans.succeeded(span.route.peer_id)
            hidden = out
            index += 1
        self.position += new_tokens
        self.last_step_routes = self.routes
        return hidden

    async def _send_step(self, span: _SpanSession, hidden: torch.Tensor, beam_idx: torch.Tensor | None,
                         prompts: torch.Tensor | None) -> torch.Tensor:
        message: dict[str, Any] = {"type": "step", "hidden": encode_tensor(hidden, self.compression),
                                   "position": self.position, "compression": self.compression.value}
        if beam_idx is not None:
            message["beam_idx"] = encode_tensor(beam_idx.to(torch.int64))
        if prompts is not None:
            message["prompts"] = encode_tensor(prompts, self.compression)
        try:
            with trio.fail_after(self.step_timeout):
                await span.stream.send(pack(message))
                reply = unpack(await span.stream.recv(), "output")
        except trio.TooSlowError:
            raise PeerUnavailableError(f"server {span.route.peer_id} did not answer within {self.step_timeout:g} s")
        return decode_tensor(message_field(reply, "hidden", dict)).to(hidden.dtype)

    async def _open_span(self, route: SpanRoute) -> _SpanSession:
        stream = await self.swarm.node.open_stream(route.peer_id, INFERENCE)
        try:
            with trio.fail_after(self.step_timeout):
                await stream.send(pack({"type": "open", "max_length": self.max_length,
                                        "batch_size": self.batch_size}))
                unpack(await stream.recv(), "opened")
        except BaseException as e:
            await stream.reset()
            if isinstance(e, trio.TooSlowError):
                raise PeerUnavailableError(f"server {route.peer_id} did not open a session in time") from None
            raise
        return _SpanSession(route, stream)

    async def _open_chain(self, start: int, end: int, *, insert_at: int,
                          replay: torch.Tensor | None = None) -> None:
        """Open sessions on a chain covering [start, end), replaying ``replay`` (inputs of block ``start``)."""
        while True:
            chain = await self.swarm.route(start, end)
            opened: list[_SpanSession] = []
            current = chain[0]
            try:
                inputs = replay
                for current in chain:
                    span = await self._open_span(current)
                    opened.append(span)
                    if inputs is not None:
                        outputs = await self._replay(span, inputs)
                        span.history.append(inputs)
                        inputs = outputs
            except (PeerUnavailableError, RemoteError) as e:
                if isinstance(e, RemoteError) and e.invalid_request:
                    raise
                for span in opened:
                    await span.stream.close()
                self._note_failure(current.peer_id, e)
                continue
            self._spans[insert_at:insert_at] = opened
            return

    async def _replay(self, span: _SpanSession, inputs: torch.Tensor) -> torch.Tensor:
        """Rebuild a new server's cache from the inputs the failed one had received (positions 0..)."""
        saved_position, self.position = self.position, 0
        try:
            return await self._send_step(span, inputs, None, None)
        finally:
            self.position = saved_position

    async def _replace(self, index: int, error: Exception) -> None:
        """Route around the failed span at ``index``: ban its server, open a replacement chain, replay."""
        failed = self._spans.pop(index)
        await failed.stream.reset()
        self._note_failure(failed.route.peer_id, error)
        await self._open_chain(failed.route.start, failed.route.end, insert_at=index, replay=failed.inputs())

    def _note_failure(self, peer_id: str, error: Exception) -> None:
        self.failovers += 1
        logger.warning("server %s failed (%s); routing around it", peer_id, error)
        self.swarm.bans.ban(peer_id)
        if self.failovers > MAX_FAILOVERS * max(1, self.swarm.num_blocks):
            raise PeerUnavailableError(f"giving up after {self.failovers} server failures; last: {error}") from error

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        self._closed = True
        for span in self._spans:
            await span.stream.close()
        self._spans.clear()
