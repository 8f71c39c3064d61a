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

from jupyter_swarm.errors import ProtocolError, RemoteError, SwarmError
from jupyter_swarm.models import BlockSpan
from jupyter_swarm.p2p.framing import FramedStream
from jupyter_swarm.runtime.adapters import ACTIVE_ADAPTER, ServedAdapters
from jupyter_swarm.runtime.cache_budget import CacheBudget, CacheFullError
from jupyter_swarm.runtime.validation import InvalidRequestError, check_hidden, check_prompts
from jupyter_swarm.wire.messages import error_message, field as message_field, pack, unpack
from jupyter_swarm.wire.protocols import MAX_BATCH_SIZE
from jupyter_swarm.wire.tensors import Compression, decode_tensor, encode_tensor

logger = logging.getLogger(__name__)


class BlocksNotServedError(InvalidRequestError):
    """The request names blocks this server does not hold (any more: it may have moved); another server may."""


MAX_SESSION_ID_CHARS = 64
MAX_CARRY = 64  # hidden states a relayed step may carry: one per server of the chain before this one
INLINE_STEP_SECONDS = 0.02


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
                 adapters: ServedAdapters | None = None):
        self.span = span
        self.adapters = adapters or ServedAdapters()
        self.adapters.attach(span)
        self.budget = CacheBudget(cache_bytes)
        self.max_session_length = max_session_length
        self.session_timeout = session_timeout
        self.step_timeout = step_timeout
        self.stats = ServiceStats()
        self._compute = trio.CapacityLimiter(1)
        self._step_seconds_per_token: float | None = None  # measured; None until a first step ran
        self._views: dict[tuple[int, int], BlockSpan] = {}
        # set by the server: opens a push stream to a peer (peer id, addresses) -> FramedStream
        self.open_push_stream: Any = None
        # sessions that take steps pushed by the previous server of their chain, by session id (a random token the
        # client gives each span of its chain) -- and only from that server
        self._push_inboxes: dict[str, _PushInbox] = {}

    def view(self, message: dict[str, Any]) -> BlockSpan:
        """The blocks a request asks for (``start``/``end``, default: the whole span), sharing the span's weights."""
        start = message_field(message, "start", int, self.span.start)
        end = message_field(message, "end", int, self.span.end)
        if not self.span.start <= start < end <= self.span.end:
            raise BlocksNotServedError(
                f"blocks {start}:{end} are not served here; this server holds blocks {self.span.start}:{self.span.end}")
        adapter = message_field(message, "active_adapter", str, None)
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

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._compute)

    async def _run_step(self, tokens: int, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` for an inference step of ``tokens`` (batch x new tokens): inline on the trio thread when
        it is predicted to take under INLINE_STEP_SECONDS, otherwise on the compute thread."""
        per_token = self._step_seconds_per_token
        started = time.perf_counter()
        if per_token is not None and tokens * per_token <= INLINE_STEP_SECONDS:
            try:
                self._compute.acquire_nowait()  # no scheduler round trip when the compute slot is free (usual)
            except trio.WouldBlock:
                await self._compute.acquire()
            try:
                result = fn(*args)
            finally:
                self._compute.release()
        else:
            result = await self._run(fn, *args)
        seconds = (time.perf_counter() - started) / tokens
        self._step_seconds_per_token = seconds if per_token is None else 0.8 * per_token + 0.2 * seconds
        return result

    # ---- forward / backward ------------------------------------------------------------------------
    async def handle_rpc(self, stream: FramedStream) -> None:
        """Answer forward/backward/info requests on one stream until the client closes it."""
        async for payload in stream.frames():
            try:
                message = unpack(payload, ("forward", "backward", "info"))
            except SwarmError as e:
                reply = self._refusal(e)
            else:
                reply = await self._answer("forward/backward", self._rpc, message)
            await stream.send(reply)

    def _refusal(self, error: SwarmError) -> bytes:
        """The error reply to a request the server refused or could not serve."""
        self.stats.errors += 1
        return error_message(str(error), invalid_request=_is_invalid(error))

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

    async def _rpc(self, message: dict[str, Any]) -> bytes:
        kind = message["type"]
        if kind == "info":
            return pack({"type": "info", "start": self.span.start, "end": self.span.end,
                         "dtype": str(self.span.dtype).removeprefix("torch."), "quant_type": self.span.quant_type.value,
                         "cache_tokens_left": self.cache_tokens_left()})
        span = self.view(message)
        compression = _compression(message)
        hidden = decode_tensor(message_field(message, "hidden", dict))
        check_hidden(hidden, hidden_size=span.hidden_size, dtype=span.dtype)
        prompts = self._prompts(message, hidden, span)
        if kind == "forward":
            self.stats.forward_requests += 1
            out = await self._run(self._forward, span, hidden, prompts)
            return pack({"type": "forward_result", "hidden": encode_tensor(out, compression)})
        grad_output = decode_tensor(message_field(message, "grad_output", dict))
        if grad_output.shape != hidden.shape:
            raise InvalidRequestError(
                f"grad_output shape {list(grad_output.shape)} must equal the hidden states' {list(hidden.shape)}")
        check_hidden(grad_output, hidden_size=self.span.hidden_size, dtype=self.span.dtype, name="grad_output")
        self.stats.backward_requests += 1
        grad_hidden, grad_prompts = await self._run(self._backward, span, hidden, grad_output, prompts)
        reply: dict[str, Any] = {"type": "backward_result", "grad_hidden": encode_tensor(grad_hidden, compression)}
        if grad_prompts is not None:
            reply["grad_prompts"] = encode_tensor(grad_prompts, compression)
        return pack(reply)

    def _prompts(self, message: dict[str, Any], hidden: torch.Tensor, span: BlockSpan) -> torch.Tensor | None:
        raw = message_field(message, "prompts", dict, None)
        if raw is None:
            return None
        prompts = decode_tensor(raw)
        check_prompts(prompts, num_blocks=span.num_blocks, batch=hidden.shape[0], seq=hidden.shape[1],
                      hidden_size=span.hidden_size, dtype=span.dtype)
        return prompts

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
        try:
            with trio.fail_after(self.step_timeout):
                opening = unpack(await stream.recv(), "open")
            max_length = message_field(opening, "max_length", int)
            batch_size = message_field(opening, "batch_size", int)
            if not 0 < max_length <= self.max_session_length:
                raise InvalidRequestError(
                    f"max_length must be in 1..{self.max_session_length} on this server, got {max_length}")
            if not 0 < batch_size <= MAX_BATCH_SIZE:
                raise InvalidRequestError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {batch_size}")
            span = self.view(opening)
            link = _relay_link(opening)
            reservation = self.budget.reserve(span.cache_bytes(batch_size, max_length))
        except trio.TooSlowError:
            return
        except (ProtocolError, RemoteError, CacheFullError) as e:
            self.stats.errors += 1
            await stream.send(error_message(str(e), invalid_request=not isinstance(e, CacheFullError) and _is_invalid(e)))
            return
        self.stats.sessions_opened += 1
        self.stats.open_sessions += 1
        try:
            cache = span.new_cache(batch_size, max_length)
            await stream.send(pack({"type": "opened", "max_length": max_length}))
            if link is None:
                await self._serve_session(stream, span, cache, batch_size)
            else:
                await self._serve_relay_session(stream, span, cache, batch_size, link)
        finally:
            self.stats.open_sessions -= 1
            reservation.release()

    async def _serve_session(self, stream: FramedStream, span: BlockSpan, cache: Any, batch_size: int,
                             receive: Any = None, push_to: dict[str, Any] | None = None) -> None:
        pusher = _Pusher(self, push_to) if push_to is not None else None
        while True:
            with trio.move_on_after(self.session_timeout) as idle:
                payload = await (stream.recv_or_none() if receive is None else receive())
                if payload is None:
                    return  # client closed the session (or died): free the cache
            if idle.cancelled_caught:
                await stream.send(error_message(f"session closed after {self.session_timeout:g} s idle"))
                return
            try:
                message = unpack(payload, "step")
            except SwarmError as e:
                message, reply = None, self._refusal(e)
            else:
                reply = await self._answer("inference step", self._step, message, span, cache, batch_size, pusher)
            if reply is not None:  # None: the step went on to the next server, which will answer the client
                await stream.send(reply)

    async def _serve_relay_session(self, stream: FramedStream, span: BlockSpan, cache: Any, batch_size: int,
                                   link: _RelayLink) -> None:
        """A session whose steps may also arrive from the previous server (``link.session_id``) and whose outputs
        may go on to the next one (``link.push_to``)."""
        if link.session_id is None:
            await self._serve_session(stream, span, cache, batch_size, push_to=link.push_to)
            return
        if link.session_id in self._push_inboxes:
            await stream.send(error_message("session id already in use", invalid_request=True))
            return
        send, receive = trio.open_memory_channel[Any](16)

        async def from_client() -> None:
            async for payload in stream.frames():
                await send.send(payload)
            await send.send(None)  # the client is gone: end the session

        self._push_inboxes[link.session_id] = _PushInbox(send, link.accept_from)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_client)
                await self._serve_session(stream, span, cache, batch_size, receive=receive.receive,
                                          push_to=link.push_to)
                nursery.cancel_scope.cancel()
        finally:
            self._push_inboxes.pop(link.session_id, None)

    async def handle_push(self, stream: FramedStream) -> None:
        """Steps pushed by other servers into our sessions (one-way). A step for an unknown session, or from a peer
        other than the session's previous server, is dropped."""
        async for payload in stream.frames():
            try:
                session_id = message_field(unpack(payload, "step"), "session_id", str)
            except (ProtocolError, RemoteError) as e:
                logger.debug("ignoring a bad pushed step from %s: %s", stream.remote_peer, e)
                continue
            inbox = self._push_inboxes.get(session_id)
            if inbox is None or inbox.accept_from not in (None, stream.remote_peer):
                logger.debug("ignoring a step pushed by %s for a session it does not feed", stream.remote_peer)
                continue
            try:
                inbox.channel.send_nowait(payload)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                logger.debug("dropping a pushed step for busy or closed session %s", session_id)

    async def _step(self, message: dict[str, Any], span: BlockSpan, cache: Any, batch_size: int,
                    pusher: _Pusher | None = None) -> bytes | None:
        """Run one step. A relayed step (``push: true``) goes on to the next server (returns None: nothing to tell
        the client) or, at the end of the chain or when the push failed, answers the client with the output and
        every input it carries, which the client keeps for replay."""
        compression = _compression(message)
        hidden = decode_tensor(message_field(message, "hidden", dict))
        check_hidden(hidden, hidden_size=span.hidden_size, dtype=span.dtype)
        if hidden.shape[0] != batch_size:
            raise InvalidRequestError(f"this session was opened for batch {batch_size}, got batch {hidden.shape[0]}")
        position = message_field(message, "position", int)
        if position != cache.length:
            raise InvalidRequestError(
                f"step starts at position {position} but the session's cache holds {cache.length} tokens")
        if cache.length + hidden.shape[1] > cache.max_length:
            raise InvalidRequestError(
                f"session is full: {cache.length} + {hidden.shape[1]} tokens exceed its max_length {cache.max_length}")
        beam_idx = message_field(message, "beam_idx", dict, None)
        beam = decode_tensor(beam_idx) if beam_idx is not None else None
        if beam is not None and (beam.ndim != 1 or beam.numel() != batch_size or beam.dtype != torch.int64
                                 or bool((beam < 0).any()) or bool((beam >= batch_size).any())):
            raise InvalidRequestError(f"beam_idx must be {batch_size} int64 row indices in 0..{batch_size - 1}")
        prompts = self._prompts(message, hidden, span)
        carry = _carried(message)  # a bad carry is refused before computing
        out = await self._run_step(hidden.shape[0] * hidden.shape[1], self._inference_step, span, hidden, cache,
                                   beam, prompts)
        self.stats.inference_steps += 1
        output = {"type": "output", "hidden": encode_tensor(out, compression), "position": cache.length}
        if message.get("push") is True:
            if pusher is not None and await pusher.push(message, output, carry):
                return None
            output.update(carry=carry, pushed=False)
        return pack(output)

    @staticmethod
    def _inference_step(span: BlockSpan, hidden: torch.Tensor, cache: Any, beam: torch.Tensor | None,
                        prompts: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            if beam is not None:
                cache.reorder(beam.to(span.device))
            return span(hidden.to(span.device), cache=cache, prompts=_to(prompts, span.device)).cpu()


@dataclass
class _RelayLink:
    """How a session takes part in a relay chain (the ``open`` message's session_id, push_to and accept_from)."""

    session_id: str | None  # steps pushed with this id enter the session
    push_to: dict[str, Any] | None  # the next server's peer_id, session_id and addrs
    accept_from: str | None  # the only peer whose pushed steps are taken (None: any; kept for older clients)


@dataclass
class _PushInbox:
    channel: trio.MemorySendChannel
    accept_from: str | None


def _relay_link(opening: dict[str, Any]) -> _RelayLink | None:
    """The relay part of an opening message, or None for a plain session."""
    session_id = message_field(opening, "session_id", str, None)
    push_to = message_field(opening, "push_to", dict, None)
    accept_from = message_field(opening, "accept_from", str, None)
    if session_id is None and push_to is None:
        return None
    if session_id is not None and not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
        raise InvalidRequestError(f"session_id must be 1..{MAX_SESSION_ID_CHARS} characters")
    if push_to is not None:
        peer = message_field(push_to, "peer_id", str)
        target = message_field(push_to, "session_id", str)
        addrs = message_field(push_to, "addrs", list, [])
        if not 0 < len(target) <= MAX_SESSION_ID_CHARS or not all(isinstance(a, str) for a in addrs):
            raise InvalidRequestError("push_to must name a peer_id, a session_id and a list of addresses")
        push_to = {"peer_id": peer, "session_id": target, "addrs": addrs[:8]}
    return _RelayLink(session_id, push_to, accept_from)


def _carried(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs a relayed step carries on: those it arrived with plus its own, when it arrived from a server
    (a step with a ``carry`` field); a step straight from the client carries nothing (the client has its input)."""
    carry = message_field(message, "carry", list, None)
    if carry is None:
        return []
    if len(carry) >= MAX_CARRY or not all(isinstance(c, dict) for c in carry):
        raise InvalidRequestError(f"carry must be a list of at most {MAX_CARRY - 1} encoded tensors")
    return [*carry, message["hidden"]]


class _Pusher:
    """Sends a session's outputs on to the next server's session, until a push fails."""

    def __init__(self, service: SpanService, push_to: dict[str, Any]):
        self.service, self.target = service, push_to
        self.stream: FramedStream | None = None
        self.broken = False

    async def push(self, message: dict[str, Any], output: dict[str, Any], carry: list[dict[str, Any]]) -> bool:
        """Push one step's output (with the inputs it carries); False when it could not (the client takes over)."""
        if self.broken or self.service.open_push_stream is None:
            return False
        step = {"type": "step", "hidden": output["hidden"], "position": message_field(message, "position", int),
                "compression": message.get("compression", "none"), "session_id": self.target["session_id"],
                "push": True, "carry": carry}
        try:
            with trio.fail_after(5):
                if self.stream is None:
                    self.stream = await self.service.open_push_stream(self.target["peer_id"], self.target["addrs"])
                await self.stream.send(pack(step))
        except (SwarmError, trio.TooSlowError) as e:
            logger.info("could not push to %s (%s); the client will send that step itself", self.target["peer_id"], e)
            self.broken = True
            return False
        return True


def _compression(message: dict[str, Any]) -> Compression:
    name = message_field(message, "compression", str, "none")
    try:
        return Compression(name)
    except ValueError:
        raise InvalidRequestError(f"unknown compression {name!r}; use one of {[c.value for c in Compression]}") from None


def _to(tensor: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
