"""The requests a server answers for its span: forward, backward and streaming inference sessions.

Handlers run on the libp2p trio thread. Model calls take turns through a capacity limiter, so sessions never
share a cache. Forward and backward run on a compute thread, so networking never waits behind a batch. A
decode step predicted to finish within ``INLINE_STEP_SECONDS`` runs on the trio thread itself: handing it to
a thread and back costs two thread wake-ups, about 1 ms of CPU on a small VM, as much as a small model's step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

import torch
import trio

from jupyter_swarm.errors import InvalidRequestError, ProtocolError, RemoteError, SwarmError
from jupyter_swarm.models import BlockSpan
from jupyter_swarm.p2p.framing import FrameTooLargeError, FramedStream
from jupyter_swarm.runtime.adapters import ACTIVE_ADAPTER, ServedAdapters
from jupyter_swarm.runtime.cache_budget import CacheBudget, CacheBudgetError, CacheFullError
from jupyter_swarm.runtime.fair_compute import FairCompute
from jupyter_swarm.runtime.limits import InFlight, PeerLimitError, ServerLimits
from jupyter_swarm.runtime.sessions import OpenSession, SessionTable
from jupyter_swarm.wire.inference import Open, Opened, Output, PushTarget, Step
from jupyter_swarm.wire.messages import ErrorReply, decode, decode_any, error_message, unpack
from jupyter_swarm.wire.rpc import Backward, BackwardResult, Forward, ForwardResult, Info, InfoResult
from jupyter_swarm.wire.tensor_fields import SpanLimits, WireTensor

logger = logging.getLogger(__name__)


class BlocksNotServedError(InvalidRequestError):
    """The request names blocks this server does not hold (any more: it may have moved); another server may."""


INLINE_STEP_SECONDS = 0.02
HOLD_AHEAD_TOKENS = 32  # a session's cache grows in the budget a little ahead of its tokens (fewer, larger grows)


def _is_invalid(error: Exception) -> bool:
    """Would every server refuse this request? (Not when it only asked the wrong server for its blocks.)"""
    return isinstance(error, (ProtocolError, RemoteError)) and not isinstance(error, BlocksNotServedError)


@dataclass
class ServiceStats:
    """Counters a server shows (and the notebook's serve panel reads)."""

    forward_requests: int = 0
    backward_requests: int = 0
    inference_steps: int = 0
    sessions_opened: int = 0
    open_sessions: int = 0
    errors: int = 0
    started_at: float = field(default_factory=time.time)


class SpanService:
    """Serves one loaded :class:`BlockSpan` to many clients at once."""

    def __init__(self, span: BlockSpan, *, cache_bytes: int, max_session_length: int = 8192,
                 session_timeout: float = 30 * 60, step_timeout: float = 5 * 60,
                 adapters: ServedAdapters | None = None, limits: ServerLimits | None = None):
        self.span = span
        self.adapters = adapters or ServedAdapters()
        self.adapters.attach(span)
        self.peer_limits = limits = limits or ServerLimits()
        self.budget = CacheBudget(cache_bytes, limits.cache_share_per_peer)
        self.sessions = SessionTable(limits.sessions_per_peer, limits.evict_idle_after)
        self.in_flight = InFlight(limits.requests_in_flight_per_peer)
        self.max_session_length = max_session_length
        self.session_timeout = session_timeout
        self.step_timeout = step_timeout
        self.stats = ServiceStats()
        self._compute = FairCompute(limits.compute_half_life)  # one model call at a time; small calls first
        self._step_seconds_per_token: float | None = None  # measured; None until a first step ran
        self._views: dict[tuple[int, int], BlockSpan] = {}
        self._limits: dict[tuple[int, int], SpanLimits] = {}
        self.limits = self.limits_of(span)  # what requests to the whole span may hold
        # set by the server: opens a push stream to a peer (peer id, addresses) -> FramedStream
        self.open_push_stream: Any = None
        # sessions that take steps pushed by the previous server of their chain, by session id (a random token the
        # client gives each span of its chain) -- and only from that server
        self._push_inboxes: dict[str, _PushInbox] = {}

    def limits_of(self, span: BlockSpan) -> SpanLimits:
        """The bounds of a request's tensors for ``span`` (the whole span or a view of it)."""
        key = (span.start, span.end)
        if key not in self._limits:
            self._limits[key] = SpanLimits(hidden_size=span.hidden_size, dtype=span.dtype, start=span.start,
                                           end=span.end)
        return self._limits[key]

    def view(self, start: int | None, end: int | None, adapter: str | None) -> BlockSpan:
        """The blocks a request asks for (default: the whole span), sharing the span's weights."""
        start, end = self.limits.blocks(start, end)
        if not self.span.start <= start < end <= self.span.end:
            raise BlocksNotServedError(
                f"blocks {start}:{end} are not served here; this server holds blocks {self.span.start}:{self.span.end}")
        self.adapters.check(adapter)
        ACTIVE_ADAPTER.set(adapter)  # this request's (or session's) task; its compute thread sees it too
        if (start, end) not in self._views:
            view = self.span.narrow(start, end)
            if view is not self.span:
                self.adapters.attach(view)
            self._views[(start, end)] = view
        return self._views[(start, end)]

    def cache_tokens_left(self) -> int:
        """How many more tokens (batch 1) the cache budget can hold."""
        per_token = max(1, self.span.cache_bytes(1, 1))
        return max(0, self.budget.free_bytes // per_token)

    async def _run(self, peer: str, tokens: int, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` over ``tokens`` tokens on a compute thread, in ``peer``'s turn of the compute slot."""
        async with self._compute.turn(peer, tokens):
            return await trio.to_thread.run_sync(fn, *args)

    async def _run_step(self, peer: str, tokens: int, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` for an inference step of ``tokens`` (batch x new tokens) in ``peer``'s turn: inline on the
        trio thread when it is predicted to take under INLINE_STEP_SECONDS, otherwise on the compute thread."""
        per_token = self._step_seconds_per_token
        started = time.perf_counter()
        if per_token is not None and tokens * per_token <= INLINE_STEP_SECONDS:
            if not self._compute.try_acquire():  # no scheduler round trip when the compute slot is free (usual)
                await self._compute.acquire(peer, tokens)
            computing = time.perf_counter()
            try:
                result = fn(*args)
            finally:
                self._compute.charge(peer, time.perf_counter() - computing)
                self._compute.release()
        else:
            result = await self._run(peer, tokens, fn, *args)
        seconds = (time.perf_counter() - started) / tokens
        self._step_seconds_per_token = seconds if per_token is None else 0.8 * per_token + 0.2 * seconds
        return result

    # ---- forward / backward ------------------------------------------------------------------------
    async def handle_rpc(self, stream: FramedStream) -> None:
        """Answer forward/backward/info requests on one stream until the client closes it."""
        stream.max_frame_bytes = self.limits.rpc_frame_bytes()
        try:
            async for payload in stream.frames():
                try:
                    request = decode_any(payload, (Forward, Backward, Info), limits=self.limits)
                except SwarmError as e:
                    reply = self._refusal(e)
                else:
                    async with self.in_flight.hold(stream.remote_peer):  # a peer's requests past its limit wait
                        reply = await self._answer("forward/backward", self._rpc, request, stream.remote_peer)
                await stream.send(reply)
        except FrameTooLargeError as e:
            await stream.send(self._refusal(e))

    def _refusal(self, error: SwarmError) -> bytes:
        """The error reply to a request the server refused or could not serve."""
        self.stats.errors += 1
        busy = isinstance(error, CacheFullError)  # memory is short right now; the client retries (without a ban)
        return error_message(str(error), invalid_request=_is_invalid(error), reason=ErrorReply.BUSY if busy else None)

    async def _answer(self, what: str, handle: Callable[..., Awaitable[bytes | None]], *args: Any) -> bytes | None:
        """``await handle(*args)``; a refusal or a bug becomes an error reply, never a dead server."""
        try:
            return await handle(*args)
        except SwarmError as e:
            return self._refusal(e)
        except Exception as e:  # a bug must not take the server down; tell the client what happened
            logger.exception("%s failed", what)
            self.stats.errors += 1
            return error_message(f"server error: {e!r}")

    async def _rpc(self, request: Forward | Backward | Info, peer: str) -> bytes:
        if isinstance(request, Info):
            return InfoResult(self.span.start, self.span.end, str(self.span.dtype).removeprefix("torch."),
                              self.span.quant_type.value, self.cache_tokens_left()).encode()
        span = self.view(request.start, request.end, request.active_adapter)
        hidden = request.hidden.decode("hidden states", finite=True)
        tokens = hidden.shape[0] * hidden.shape[1]  # the call's size, for its place in the compute queue
        prompts = _decoded(request.prompts, "prompts")
        compression = request.compression
        if not isinstance(request, Backward):
            self.stats.forward_requests += 1
            out = await self._run(peer, tokens, self._forward, span, hidden, prompts)
            return ForwardResult(WireTensor.encode(out, compression)).encode()
        grad_output = _decoded(request.grad_output, "grad_output")
        self.stats.backward_requests += 1
        grad_hidden, grad_prompts = await self._run(peer, tokens, self._backward, span, hidden, grad_output, prompts)
        return BackwardResult(WireTensor.encode(grad_hidden, compression),
                              None if grad_prompts is None else WireTensor.encode(grad_prompts, compression)).encode()

    @staticmethod
    def _forward(span: BlockSpan, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            return span(hidden.to(span.device), prompts=_to(prompts, span.device)).cpu()

    @staticmethod
    def _backward(span: BlockSpan, hidden: torch.Tensor, grad_output: torch.Tensor,
                  prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad():
            hidden = hidden.to(span.device).requires_grad_(True)
            inputs = [hidden]
            if prompts is not None:
                prompts = prompts.to(span.device).requires_grad_(True)
                inputs.append(prompts)
            out = span(hidden, prompts=prompts)
            grads = torch.autograd.grad(out, inputs, grad_outputs=grad_output.to(span.device))
        return grads[0].cpu(), (grads[1].cpu() if prompts is not None else None)

    # ---- inference sessions -------------------------------------------------------------------------
    async def handle_inference(self, stream: FramedStream) -> None:
        """One inference session per stream: open, then steps, until the client closes or goes idle."""
        stream.max_frame_bytes = self.limits.inference_frame_bytes()
        try:
            with trio.fail_after(self.step_timeout):
                opening = decode(await stream.recv(), Open)
            if opening.max_length > self.max_session_length:
                raise InvalidRequestError(
                    f"max_length must be in 1..{self.max_session_length} on this server, got {opening.max_length}")
            span = self.view(opening.start, opening.end, opening.active_adapter)
            link = _relay_link(opening)
            self.sessions.check_room(stream.remote_peer)
            reservation = self.budget.open(span.cache_bytes(opening.batch_size, opening.max_length),
                                           stream.remote_peer)
        except trio.TooSlowError:
            return
        except (ProtocolError, RemoteError, CacheBudgetError, PeerLimitError) as e:
            self.stats.errors += 1
            await stream.send(error_message(str(e), invalid_request=_is_invalid(e)))
            return
        entry = self.sessions.add(stream.remote_peer, reservation)
        self.stats.sessions_opened += 1
        self.stats.open_sessions += 1
        try:
            cache = span.new_cache(opening.batch_size, opening.max_length)
            await stream.send(Opened(opening.max_length).encode())
            session = _Session(span, self.limits_of(span), cache, opening.batch_size, entry,
                               span.cache_bytes(opening.batch_size, 1))
            if link is None:
                await self._serve_session(stream, session)
            else:
                await self._serve_relay_session(stream, session, link)
        finally:
            self.stats.open_sessions -= 1
            self.sessions.remove(entry)
            reservation.release()

    async def _hold(self, session: _Session, tokens: int) -> None:
        """Grow the session's part of the cache budget to ``tokens`` tokens (and a few ahead). When the budget is
        full, idle sessions are evicted, longest idle first, and peers over their fair share yield to lighter ones
        (see runtime/sessions.py); when nothing can go yet, the step waits up to ``evict_idle_after`` seconds
        before it fails with CacheFullError."""
        reservation = session.entry.reservation
        size = session.bytes_per_token * (tokens + HOLD_AHEAD_TOKENS)
        if size <= reservation.size:
            return
        deadline = trio.current_time() + self.peer_limits.evict_idle_after
        while True:
            try:
                reservation.grow_to(size)
                return
            except CacheFullError:
                needed = min(size, reservation.declared) - reservation.size
                if self.sessions.evict_for(needed, self.budget.free_bytes, peer=session.entry.peer,
                                           budget_bytes=self.budget.total_bytes, held=self.budget.used_by_peer()):
                    logger.info("evicted idle sessions to make room for %.1f MiB of cache", needed / 2**20)
                    continue
                if trio.current_time() >= deadline:
                    raise
            await trio.sleep(0.05)

    async def _serve_session(self, stream: FramedStream, session: _Session, receive: Any = None,
                             push_to: PushTarget | None = None) -> None:
        """Answer a session's steps: from the client's stream, or (``receive``) from the client and pushes alike."""
        pusher = _Pusher(self, push_to) if push_to is not None else None
        while True:
            with trio.move_on_after(self.session_timeout) as idle:
                session.entry.waiting(idle)  # from now on it may be evicted (which cancels this wait)
                try:
                    item = await (stream.recv() if receive is None else receive())
                except FrameTooLargeError as e:
                    await stream.send(self._refusal(e))
                    return
                except SwarmError:
                    item = None
                if item is None:
                    return  # client closed the session (or died): free the cache
            session.entry.working()
            if session.entry.evicted:
                await stream.send(ErrorReply(
                    "this server evicted your idle inference session to make room for another one (its cache budget "
                    "is full); replay the session's inputs to continue", reason=ErrorReply.EVICTED).encode())
                return
            if idle.cancelled_caught:
                await stream.send(error_message(f"session closed after {self.session_timeout:g} s idle"))
                return
            try:
                step = item if isinstance(item, Step) else decode(item, Step, limits=session.limits)
            except SwarmError as e:
                reply = self._refusal(e)
            else:
                reply = await self._answer("inference step", self._step, step, session, pusher)
            if reply is not None:  # None: the step went on to the next server, which will answer the client
                await stream.send(reply)

    async def _serve_relay_session(self, stream: FramedStream, session: _Session, link: _RelayLink) -> None:
        """A session whose steps may also arrive from the previous server (``link.session_id``) and whose outputs
        may go on to the next one (``link.push_to``)."""
        if link.session_id is None:
            await self._serve_session(stream, session, push_to=link.push_to)
            return
        if link.session_id in self._push_inboxes:
            await stream.send(error_message("session id already in use", invalid_request=True))
            return
        send, receive = trio.open_memory_channel[Any](16)

        async def from_client() -> None:
            try:
                async for payload in stream.frames():
                    await send.send(payload)
            except FrameTooLargeError as e:
                await stream.send(self._refusal(e))
            await send.send(None)  # the client is gone: end the session

        self._push_inboxes[link.session_id] = _PushInbox(send, link.accept_from, session.limits)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_client)
                await self._serve_session(stream, session, receive=receive.receive, push_to=link.push_to)
                nursery.cancel_scope.cancel()
        finally:
            self._push_inboxes.pop(link.session_id, None)

    async def handle_push(self, stream: FramedStream) -> None:
        """Steps pushed by other servers into our sessions (one-way). A step for an unknown session, or from a peer
        other than the session's previous server, is dropped, and so is a step that does not fit the session."""
        stream.max_frame_bytes = self.limits.push_frame_bytes()
        try:
            async for payload in stream.frames():
                try:
                    message = unpack(payload, Step.TYPE)
                    session_id = message.get("session_id")
                    inbox = self._push_inboxes.get(session_id) if isinstance(session_id, str) else None
                    if inbox is None or inbox.accept_from not in (None, stream.remote_peer):
                        logger.debug("ignoring a step pushed by %s for a session it does not feed", stream.remote_peer)
                        continue
                    step = Step.from_wire(message, limits=inbox.limits)
                except (ProtocolError, RemoteError) as e:
                    logger.debug("ignoring a bad pushed step from %s: %s", stream.remote_peer, e)
                    continue
                try:
                    inbox.channel.send_nowait(step)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    logger.debug("dropping a pushed step for busy or closed session %s", session_id)
        except FrameTooLargeError as e:
            logger.debug("stopped reading pushes from %s: %s", stream.remote_peer, e)

    async def _step(self, step: Step, session: _Session, pusher: _Pusher | None = None) -> bytes | None:
        """Run one step. A relayed step (``push``) goes on to the next server (returns None: nothing to tell
        the client) or, at the end of the chain or when the push failed, answers the client with the output and
        every input it carries, which the client keeps for replay."""
        cache, batch_size = session.cache, session.batch_size
        batch, new_tokens = step.hidden.shape[0], step.hidden.shape[1]
        if batch != batch_size:  # every size is checked on the headers, before anything is decoded
            raise InvalidRequestError(f"this session was opened for batch {batch_size}, got batch {batch}")
        if step.position > cache.length:
            raise InvalidRequestError(
                f"step starts at position {step.position} but the session's cache holds {cache.length} tokens; a step "
                "starts where the cache ends, or before (to step back: the cache beyond it is dropped)")
        if step.position + new_tokens > cache.max_length:
            raise InvalidRequestError(
                f"session is full: {step.position} + {new_tokens} tokens exceed its max_length {cache.max_length}")
        beam = _decoded(step.beam_idx, "beam_idx")
        if beam is not None and (bool((beam < 0).any()) or bool((beam >= batch_size).any())):
            raise InvalidRequestError(f"beam_idx must be {batch_size} int64 row indices in 0..{batch_size - 1}")
        prompts = _decoded(step.prompts, "prompts")
        hidden = step.hidden.decode("hidden states", finite=True)
        await self._hold(session, step.position + new_tokens)
        # what a relayed step carries on: the inputs it arrived with plus its own, when it arrived from a server;
        # a step straight from the client carries nothing (the client has its input)
        carry = [] if step.carry is None else [*step.carry, step.hidden]
        out = await self._run_step(session.entry.peer, batch * new_tokens, self._inference_step, session.span,
                                   hidden, cache, step.position, beam, prompts)
        self.stats.inference_steps += 1
        output = Output(WireTensor.encode(out, step.compression), cache.length)
        if step.push:
            if pusher is not None and await pusher.push(step, output.hidden, carry):
                return None
            output.carry = carry
        return output.encode()

    @staticmethod
    def _inference_step(span: BlockSpan, hidden: torch.Tensor, cache: Any, position: int, beam: torch.Tensor | None,
                        prompts: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            if position < cache.length:  # the client stepped back (e.g. rejected speculative tokens)
                cache.crop(position)
            if beam is not None:
                cache.reorder(beam.to(span.device))
            return span(hidden.to(span.device), cache=cache, prompts=_to(prompts, span.device)).cpu()


@dataclass
class _Session:
    """One open inference session: its blocks, the bounds of its steps, its cache."""

    span: BlockSpan
    limits: SpanLimits
    cache: Any
    batch_size: int
    entry: OpenSession  # in the server's session table
    bytes_per_token: int  # of its cache (for its batch)


@dataclass
class _RelayLink:
    """How a session takes part in a relay chain (the ``open`` message's session_id, push_to and accept_from)."""

    session_id: str | None  # steps pushed with this id enter the session
    push_to: PushTarget | None  # the next server's session
    accept_from: str | None  # the only peer whose pushed steps are taken (None: any)


@dataclass
class _PushInbox:
    channel: trio.MemorySendChannel
    accept_from: str | None
    limits: SpanLimits


def _relay_link(opening: Open) -> _RelayLink | None:
    """The relay part of an opening message, or None for a plain session."""
    if opening.session_id is None and opening.push_to is None:
        return None
    return _RelayLink(opening.session_id, opening.push_to, opening.accept_from)


class _Pusher:
    """Sends a session's outputs on to the next server's session, until a push fails."""

    def __init__(self, service: SpanService, push_to: PushTarget):
        self.service, self.target = service, push_to
        self.stream: FramedStream | None = None
        self.broken = False

    async def push(self, step: Step, output: WireTensor, carry: list[WireTensor]) -> bool:
        """Push one step's output (with the inputs it carries); False when it could not (the client takes over)."""
        if self.broken or self.service.open_push_stream is None:
            return False
        pushed = Step(output, step.position, step.compression, push=True, session_id=self.target.session_id,
                      carry=carry)
        try:
            with trio.fail_after(5):
                if self.stream is None:
                    self.stream = await self.service.open_push_stream(self.target.peer_id, self.target.addrs)
                await self.stream.send(pushed.encode())
        except (SwarmError, trio.TooSlowError) as e:
            logger.info("could not push to %s (%s); the client will send that step itself", self.target.peer_id, e)
            self.broken = True
            return False
        return True


def _decoded(tensor: WireTensor | None, name: str) -> torch.Tensor | None:
    """A request's optional tensor, decoded (its header was checked when the message was read) and finite."""
    return None if tensor is None else tensor.decode(name, finite=True)


def _to(tensor: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
