"""Batched forward and backward through the swarm's blocks, as one differentiable torch operation.

The forward pass remembers the input each span received; the backward pass sends those inputs with
the output gradients back through the same spans in reverse. A failed server is routed around: its
span is recomputed on other servers (forward to rebuild intermediate inputs, then backward).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch

from jupyter_swarm.client.routing import SpanRoute
from jupyter_swarm.client.swarm import SwarmClient
from jupyter_swarm.errors import PeerUnavailableError, RemoteError
from jupyter_swarm.wire.rpc import Backward, BackwardResult, Forward, ForwardResult
from jupyter_swarm.wire.tensor_fields import WireTensor
from jupyter_swarm.wire.tensors import Compression

logger = logging.getLogger(__name__)
M = TypeVar("M")

MAX_ATTEMPTS = 8


class RemoteBlocks:
    """Forward/backward of blocks [0, num_blocks) over a swarm."""

    def __init__(self, swarm: SwarmClient, compression: Compression = Compression.NONE):
        self.swarm = swarm
        self.compression = compression

    def __call__(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable forward of hidden states [batch, seq, hidden] through every block."""
        if prompts is None:
            prompts = torch.empty(0, dtype=hidden.dtype)
        return _RemoteBlocksFunction.apply(hidden, prompts, self)

    # ---- trio side -------------------------------------------------------------------------------------
    async def aforward(self, hidden: torch.Tensor, prompts: torch.Tensor | None,
                       start: int = 0, end: int | None = None) -> tuple[torch.Tensor, list[tuple[SpanRoute, torch.Tensor]]]:
        """Forward [start, end); returns the output and each span's (route, input) for backward."""
        end = self.swarm.num_blocks if end is None else end
        trace: list[tuple[SpanRoute, torch.Tensor]] = []
        block = start
        attempts = 0
        while block < end:
            route = (await self.swarm.route(block, end, purpose="forward"))[0]
            try:
                out = await self._forward(route, hidden, _slice(prompts, route))
            except (PeerUnavailableError, RemoteError) as e:
                attempts = self._failed(route, e, attempts)
                continue
            trace.append((route, hidden))
            hidden = out
            block = route.end
        return hidden, trace

    async def abackward(self, trace: list[tuple[SpanRoute, torch.Tensor]], grad: torch.Tensor,
                        prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backward through a forward trace; returns grads w.r.t. the first input and the prompts."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for route, inputs in reversed(trace):
            grad, span_grad_prompts = await self._backward_span(route, inputs, grad, prompts)
            if grad_prompts is not None and span_grad_prompts is not None:
                grad_prompts[route.start:route.end] += span_grad_prompts
        return grad, grad_prompts

    async def _backward_span(self, route: SpanRoute, inputs: torch.Tensor, grad: torch.Tensor,
                             prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attempts = 0
        while True:
            try:
                span_prompts = _slice(prompts, route)
                request = Backward(*self._request_fields(route, inputs, span_prompts),
                                   grad_output=WireTensor.encode(grad, self.compression))
                reply = await self._ask(route, request, BackwardResult, shape=tuple(inputs.shape),
                                        prompts_shape=None if span_prompts is None else tuple(span_prompts.shape))
                grad_hidden = reply.grad_hidden.decode().to(grad.dtype)
                grad_prompts = None if reply.grad_prompts is None else reply.grad_prompts.decode().to(grad.dtype)
                return grad_hidden, grad_prompts
            except (PeerUnavailableError, RemoteError) as e:
                attempts = self._failed(route, e, attempts)
            # The server is gone: redo this span on others (forward for the inner inputs, then backward).
            try:
                _, sub_trace = await self.aforward(inputs, prompts, route.start, route.end)
                if len(sub_trace) == 1:
                    route = sub_trace[0][0]
                    continue
                return await self.abackward(sub_trace, grad, prompts)
            except (PeerUnavailableError, RemoteError) as e:
                attempts = self._failed(route, e, attempts)

    async def _forward(self, route: SpanRoute, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        reply = await self._ask(route, Forward(*self._request_fields(route, hidden, prompts)), ForwardResult,
                                shape=tuple(hidden.shape))
        return reply.hidden.decode().to(hidden.dtype)

    def _request_fields(self, route: SpanRoute, hidden: torch.Tensor, prompts: torch.Tensor | None) -> tuple:
        """The fields of a forward or backward request for ``route`` (in :class:`Forward`'s order)."""
        return (WireTensor.encode(hidden, self.compression), route.start, route.end, self.compression,
                self.swarm.active_adapter, None if prompts is None else WireTensor.encode(prompts, self.compression))

    async def _ask(self, route: SpanRoute, request: Forward, reply_kind: type[M], **context: Any) -> M:
        reply = await self.swarm.rpc(route.peer_id, request, reply_kind, **context)
        self.swarm.bans.succeeded(route.peer_id)
        return reply

    def _failed(self, route: SpanRoute, error: Exception, attempts: int) -> int:
        if isinstance(error, RemoteError) and error.invalid_request:
            raise error  # the request itself is invalid; another server would refuse it too
        logger.warning("server %s failed on blocks %d:%d (%s); retrying elsewhere",
                       route.peer_id, route.start, route.end, error)
        self.swarm.bans.ban(route.peer_id)
        if attempts + 1 >= MAX_ATTEMPTS:
            raise PeerUnavailableError(f"giving up on blocks {route.start}:{route.end} after {MAX_ATTEMPTS} "
                                       f"failed attempts; last error: {error}") from error
        return attempts + 1


def _slice(prompts: torch.Tensor | None, route: SpanRoute) -> torch.Tensor | None:
    return None if prompts is None else prompts[route.start:route.end]


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor, blocks: RemoteBlocks) -> torch.Tensor:
        real_prompts = prompts if prompts.numel() else None
        out, trace = blocks.swarm.node.call(blocks.aforward, hidden.detach(),
                                            None if real_prompts is None else real_prompts.detach())
        ctx.blocks, ctx.trace, ctx.has_prompts = blocks, trace, real_prompts is not None
        ctx.save_for_backward(prompts)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        (prompts,) = ctx.saved_tensors
        blocks: RemoteBlocks = ctx.blocks
        grad_hidden, grad_prompts = blocks.swarm.node.call(
            blocks.abackward, ctx.trace, grad.contiguous(), prompts.detach() if ctx.has_prompts else None)
        return grad_hidden, (grad_prompts if ctx.has_prompts else None), None
