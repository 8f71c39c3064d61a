"""Client side of an inference session, with the dual cache that makes it survive server failures.

Each server keeps the attention cache of its span; the client keeps every input it sent to each span.
When a server fails, the client bans it, finds a replacement chain for that span, replays the inputs
to rebuild the cache there, and carries on: the generated tokens are the same as without the failure.

Small steps are relayed: the client sends a step to the first server only, each server pushes its output
to the next, and the last one answers with the output and every span's input (which the client keeps for
replay). That is one message per server plus one, instead of two per server.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from jupyter_swarm.client.routing import SpanRoute
from jupyter_swarm.client.swarm import SwarmClient
from jupyter_swarm.client.verification import WrongOutputError, check_finite
from jupyter_swarm.errors import (ConfigurationError, PeerUnavailableError, ProtocolError, RemoteError,
                                  ServerBusyError, SessionEvictedError, SwarmError)
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.wire.inference import Open, Opened, Output, PushTarget, Step
from jupyter_swarm.wire.messages import decode
from jupyter_swarm.wire.protocols import INFERENCE, MAX_RELAY_SPANS, RELAY_MAX_TOKENS
from jupyter_swarm.wire.tensor_fields import WireTensor
from jupyter_swarm.wire.tensors import Compression

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 8
BUSY_BACKOFF = 0.25  # seconds before replaying a session to a server whose cache was full


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
    failure: Exception | None = None  # the stream failed while the client was waiting on another span

    def inputs(self) -> torch.Tensor | None:
        if not self.history:
            return None
        if len(self.history) > 1:
            self.history = [torch.cat(self.history, dim=1)]
        return self.history[0]

    def truncate(self, length: int) -> None:
        """Keep the inputs of the first ``length`` positions only (chunks past it go, the last one is cut)."""
        kept = sum(chunk.shape[1] for chunk in self.history)
        while self.history and kept - self.history[-1].shape[1] >= length:
            kept -= self.history.pop().shape[1]
        if kept > length:
            self.history[-1] = self.history[-1][:, :length - kept]


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
        self.output_ids: torch.Tensor | None = None  # every token generate() has seen or made in this session
        self._first_prompts: torch.Tensor | None = None  # deep prompts of the step at position 0, resent on replay
        self._push_ready = False  # servers of the chain push outputs to each other (see _relay_step)
        # with relaying, every span's replies arrive here (tagged with the span), read by one task per stream
        self._replies: Any = None
        self._replies_in: Any = None
        self.active_adapter = swarm.active_adapter  # the LoRA adapter of the whole session

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (the servers freed its caches)."""
        return self._closed

    @property
    def routes(self) -> list[SpanRoute]:
        """The chain of servers the session currently uses."""
        return [s.route for s in self._spans]

    # ---- public synchronous API --------------------------------------------------------------------
    def step(self, hidden: torch.Tensor, *, beam_idx: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Send the new tokens' hidden states [batch, n, hidden] through every block; returns the last block's output."""
        return self.swarm.node.call(self.astep, hidden, beam_idx, prompts)

    def rollback(self, position: int) -> None:
        """Forget the tokens from ``position`` on (e.g. speculative tokens the model rejected): the next step starts
        there. Nothing is sent now; each server drops its cache beyond ``position`` when that step arrives, and the
        inputs kept for replay are cut to match, so a replacement server rebuilds exactly the kept tokens."""
        if self._closed:
            raise SessionClosedError("this inference session is closed; open a new one with model.inference_session()")
        if not 0 <= position <= self.position:
            raise ConfigurationError(f"cannot roll this session back to position {position}: it holds "
                                     f"{self.position} tokens (roll back to 0..{self.position})")
        for span in self._spans:
            span.truncate(position)
        self.position = position

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
        if prompts is not None and self.position == 0:
            self._first_prompts = prompts.detach()
        if beam_idx is not None:
            for span in self._spans:
                inputs = span.inputs()
                if inputs is not None:
                    span.history = [inputs.index_select(0, beam_idx)]
        index = 0
        if self._push_ready and beam_idx is None and prompts is None and batch * new_tokens <= RELAY_MAX_TOKENS:
            hidden, index = await self._relay_step(hidden)
        while index < len(self._spans):
            span = self._spans[index]
            span_prompts = None if prompts is None else prompts[span.route.start:span.route.end]
            try:
                out = await self._send_step(span, hidden, beam_idx, span_prompts)
                await self._verify(span, hidden, out)
            except (PeerUnavailableError, RemoteError, WrongOutputError) as e:
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
        step = self._step_message(hidden)
        if beam_idx is not None:
            step.beam_idx = WireTensor.encode(beam_idx.to(torch.int64))
        if prompts is not None:
            step.prompts = WireTensor.encode(prompts, self.compression)
        try:
            with trio.fail_after(self.step_timeout):
                if span.failure is not None:
                    raise span.failure
                await span.stream.send(step.encode())
                reply = decode(await self._recv(span), Output, shape=tuple(hidden.shape))
        except trio.TooSlowError:
            raise PeerUnavailableError(f"server {span.route.peer_id} did not answer within {self.step_timeout:g} s")
        output = reply.hidden.decode().to(hidden.dtype)
        check_finite(span.route.peer_id, [output], "an output")
        return output

    async def _verify(self, span: _SpanSession, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """Now and then (the swarm's ``verifier.probability``), re-run ``span``'s step on a second server and
        compare; raises WrongOutputError if ``span``'s server was wrong (see client/verification.py)."""
        verifier = self.swarm.verifier
        if self._first_prompts is not None or not verifier.should_check():
            return  # sessions with deep prompts are not checked: the prompts are not part of the replay history
        previous = span.inputs()
        inputs = hidden if previous is None else torch.cat([previous, hidden], dim=1)
        await verifier.check(span.route, inputs, output, self.compression)

    def _step_message(self, hidden: torch.Tensor, *, push: bool = False) -> Step:
        """The step message for new tokens' hidden states at the session's position."""
        return Step(WireTensor.encode(hidden, self.compression), self.position, self.compression, push=push)

    async def _recv(self, span: _SpanSession) -> bytes:
        """The next reply of ``span`` (from its stream, or from the shared inbox when relaying)."""
        if self._replies is None:
            return await span.stream.recv()
        while True:
            source, item = await self._replies.receive()
            if source is span:
                if isinstance(item, Exception):
                    raise item
                return item
            if isinstance(item, Exception) and source in self._spans:
                source.failure = item  # surfaces when the client next sends to that span
            # anything else is from a span no longer in the chain, or an unasked-for reply: dropped

    async def _read_replies(self, span: _SpanSession) -> None:
        """Forward every reply of ``span`` to the shared inbox, then the error that ended its stream."""
        try:
            while True:
                self._replies_in.send_nowait((span, await span.stream.recv()))
        except Exception as e:  # noqa: BLE001 - this task runs in the host's nursery: it must never raise
            try:
                self._replies_in.send_nowait((span, e if isinstance(e, SwarmError) else PeerUnavailableError(repr(e))))
            except trio.ClosedResourceError:
                pass

    async def _relay_step(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One step relayed from server to server: the client sends the input to the first server only; the last
        one (or one that could not push) answers with its output and the inputs of every span up to it.

        Returns the output and the number of spans done. If a push failed, the caller sends the step on to the
        remaining spans itself; if a server failed, the whole chain is rebuilt from the first span's inputs
        (the client cannot know which servers took the step) and the caller sends the step through it. Either
        way relaying is off for the rest of the session.
        """
        spans = list(self._spans)
        message = self._step_message(hidden, push=True).encode()
        source = spans[-1]
        try:
            with trio.fail_after(self.step_timeout):
                source = spans[0]
                if source.failure is not None:
                    raise source.failure
                await source.stream.send(message)
                source = spans[-1]  # blamed if nobody answers in time
                while True:
                    sender, item = await self._replies.receive()
                    if sender in spans:
                        source = sender
                        break
                if isinstance(item, Exception):
                    raise item
                index = spans.index(source)
                reply = decode(item, Output, shape=tuple(hidden.shape))
                if reply.carry is None or len(reply.carry) != index:
                    raise ProtocolError(f"server {source.route.peer_id} answered a relayed step with "
                                        f"{len(reply.carry or [])} carried inputs (expected {index})")
                output = reply.hidden.decode().to(hidden.dtype)
                carry = [c.decode().to(hidden.dtype) for c in reply.carry]  # shapes checked by decode()
                # before anything enters the replay history: a NaN there would poison every later failover
                check_finite(source.route.peer_id, [output, *carry], "a relayed step's output or carried inputs")
        except (SwarmError, trio.TooSlowError) as e:
            if isinstance(e, RemoteError) and e.invalid_request and source is spans[0]:
                raise  # the client's own step is bad; any server would refuse it
            if isinstance(e, trio.TooSlowError):
                e = PeerUnavailableError(f"no server of the chain answered within {self.step_timeout:g} s")
            self._push_ready = False
            await self._rebuild_chain(source.route.peer_id, e)
            return hidden, 0
        inputs = [hidden, *carry]
        try:
            for span, span_input, span_output in zip(spans, inputs, [*inputs[1:], output]):
                await self._verify(span, span_input, span_output)
        except WrongOutputError as e:  # the chain's caches may hold its wrong outputs: rebuild it from our inputs
            self._push_ready = False
            await self._rebuild_chain(e.peer_id, e)
            return hidden, 0
        for span, span_input in zip(spans, inputs):
            span.history.append(span_input)
            self.swarm.bans.succeeded(span.route.peer_id)
        if index + 1 < len(spans):
            self._push_ready = False  # a push failed: the client drives the rest of this session
        return output, index + 1

    async def _rebuild_chain(self, peer_id: str, error: Exception) -> None:
        """Replace every span of the chain (after ``peer_id`` failed a relayed step) and replay the inputs."""
        old, self._spans = self._spans, []
        for span in old:
            await span.stream.reset()
        await self._note_failure(peer_id, error)
        await self._open_chain(0, self.swarm.num_blocks, insert_at=0, replay=old[0].inputs() if old else None)

    async def _open_span(self, route: SpanRoute, link: dict[str, Any] | None = None) -> _SpanSession:
        stream = await self.swarm.node.open_stream(route.peer_id, INFERENCE)
        try:
            with trio.fail_after(self.step_timeout):
                opening = Open(self.max_length, self.batch_size or 1, route.start, route.end, self.active_adapter,
                               **(link or {}))
                await stream.send(opening.encode())
                decode(await stream.recv(), Opened)
        except BaseException as e:
            await stream.reset()
            if isinstance(e, trio.TooSlowError):
                raise PeerUnavailableError(f"server {route.peer_id} did not open a session in time") from None
            raise
        span = _SpanSession(route, stream)
        if self._replies_in is not None:
            self.swarm.node.spawn(self._read_replies, span)
        return span

    async def _open_chain(self, start: int, end: int, *, insert_at: int,
                          replay: torch.Tensor | None = None) -> None:
        """Open sessions on a chain covering [start, end), replaying ``replay`` (inputs of block ``start``)."""
        while True:
            chain = await self.swarm.route(start, end, cache_tokens=(self.batch_size or 1) * self.max_length)
            opened: list[_SpanSession] = []
            current = chain[0]
            # relaying: only for a whole new chain (a replacement would need its neighbours re-linked)
            relay = self.swarm.push and not self._spans and replay is None and 1 < len(chain) <= MAX_RELAY_SPANS
            if relay and self._replies is None:
                self._replies_in, self._replies = trio.open_memory_channel[Any](math.inf)
            links = _relay_links(chain) if relay else [None] * len(chain)
            try:
                inputs = replay
                for k, current in enumerate(chain):
                    span = await self._open_span(current, links[k])
                    opened.append(span)
                    if inputs is not None:
                        outputs = await self._replay(span, inputs)
                        span.history.append(inputs)
                        inputs = outputs
            except (PeerUnavailableError, RemoteError, WrongOutputError) as e:
                if isinstance(e, RemoteError) and e.invalid_request:
                    raise
                for span in opened:
                    await span.stream.close()
                await self._note_failure(current.peer_id, e)
                continue
            self._spans[insert_at:insert_at] = opened
            self._push_ready = relay
            return

    async def _replay(self, span: _SpanSession, inputs: torch.Tensor) -> torch.Tensor:
        """Rebuild a new server's cache from the inputs the failed one had received (positions 0..)."""
        saved_position, self.position = self.position, 0
        try:
            prompts = self._first_prompts
            span_prompts = None if prompts is None else prompts[span.route.start:span.route.end]
            return await self._send_step(span, inputs, None, span_prompts)
        finally:
            self.position = saved_position

    async def _replace(self, index: int, error: Exception) -> None:
        """Route around the failed span at ``index``: ban its server, open a replacement chain, replay."""
        failed = self._spans.pop(index)
        await failed.stream.reset()
        await self._note_failure(failed.route.peer_id, error)
        await self._open_chain(failed.route.start, failed.route.end, insert_at=index, replay=failed.inputs())

    async def _note_failure(self, peer_id: str, error: Exception) -> None:
        self.failovers += 1
        if isinstance(error, (SessionEvictedError, ServerBusyError)):  # the server is fine, only short of memory
            logger.info("server %s is short of cache memory (%s); replaying this session", peer_id, error)
            if isinstance(error, ServerBusyError):
                await trio.sleep(BUSY_BACKOFF * min(self.failovers, 8))
        else:
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
        if self._replies_in is not None:
            await self._replies_in.aclose()


def _relay_links(chain: list[SpanRoute]) -> list[dict[str, Any]]:
    """The relay fields of each span's :class:`Open` message: its own session id, the next span to push to, and the
    previous server, the only peer whose pushes it takes."""
    ids = [secrets.token_hex(8) for _ in chain]
    links: list[dict[str, Any]] = []
    for k, route in enumerate(chain):
        link: dict[str, Any] = {"session_id": ids[k]}
        if k + 1 < len(chain):
            link["push_to"] = PushTarget(chain[k + 1].peer_id, ids[k + 1], list(chain[k + 1].addrs))
        if k > 0:
            link["accept_from"] = chain[k - 1].peer_id
        links.append(link)
    return links
