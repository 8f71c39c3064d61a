"""Batched forward and backward through the swarm's blocks, as one differentiable torch operation.

The forward pass remembers the input each span received; the backward pass sends those inputs with
the output gradients back through the same spans in reverse. A failed server is routed around: its
span is recomputed on other servers (forward to rebuild intermediate inputs, then backward).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from jupyter_swarm.client.routing import SpanRoute
from jupyter_swarm.client.swarm import SwarmClient
from jupyter_swarm.errors import PeerUnavailableError, RemoteError
from jupyter_swarm.wire.messages import field as message_field
from jupyter_swarm.wire.tensors import Compression, decode_tensor, encode_tensor

logger = logging.getLogger(__name__)

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
                out = await self._call(route, "forward", hidden, _slice(prompts, route))
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
                reply = await self._request(route, "backward", inputs, _slice(prompts, route), grad_output=grad)
                grad_hidden = decode_tensor(message_field(reply, "grad_hidden", dict)).to(grad.dtype)
                raw = message_field(reply, "grad_prompts", dict, None)
                return grad_hidden, (decode_tensor(raw).to(grad.dtype) if raw is not None else None)
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

    async def _call(self, route: SpanRoute, kind: str, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        reply = await self._request(route, kind, hidden, prompts)
        return decode_tensor(message_field(reply, "hidden", dict)).to(hidden.dtype)

    async def _request(self, route: SpanRoute, kind: str, hidden: torch.Tensor, prompts: torch.Tensor | None,
                       grad_output: torch.Tensor | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"type": kind, "hidden": encode_tensor(hidden, self.compression),
                                   "compression": self.compression.value, "start": route.start, "end": route.end}
        if self.swarm.active_adapter is not None:
            message["active_adapter"] = self.swarm.active_adapter
        if prompts is not None:
            message["prompts"] = encode_tensor(prompts, self.compression)
        if grad_output is not None:
            message["grad_output"] = encode_tensor(grad_output, self.compression)
        reply = await self.swarm.rpc(route.peer_id, message, f"{kind}_result")
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
