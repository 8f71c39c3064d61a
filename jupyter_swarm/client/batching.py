"""Large batches through the swarm: split into row chunks that run at the same time, possibly on different servers.

A server accepts at most ``MAX_BATCH_TOKENS`` tokens (and ``MAX_BATCH_SIZE`` rows) per request, so a larger batch
is cut into chunks of whole rows. The chunks go through the blocks concurrently; each chunk picks its own route
(routing spreads batched work over servers by throughput), so with several servers per span the chunks run in
parallel on different machines. Forward and backward are one differentiable operation, as with
:class:`RemoteBlocks`, and each chunk keeps RemoteBlocks' failover: the gradient is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import trio

from jupyter_swarm.client.remote_blocks import RemoteBlocks
from jupyter_swarm.wire.protocols import MAX_BATCH_SIZE, MAX_BATCH_TOKENS

try:
    BaseExceptionGroup
except NameError:  # Python 3.10: trio depends on the backport
    from exceptiongroup import BaseExceptionGroup


def chunk_rows(batch: int, seq_len: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[tuple[int, int]]:
    """Row ranges ``[(start, end), ...]`` covering ``batch`` rows, each at most ``max_tokens`` tokens."""
    rows = max(1, min(MAX_BATCH_SIZE, max_tokens // max(1, seq_len)))
    return [(start, min(batch, start + rows)) for start in range(0, batch, rows)]


def remote_blocks_chunked(blocks: RemoteBlocks, hidden: torch.Tensor, prompts: torch.Tensor | None = None, *,
                          max_tokens: int = MAX_BATCH_TOKENS) -> torch.Tensor:
    """Like ``blocks(hidden, prompts)``, for a batch of any size (one request per chunk of rows)."""
    chunks = chunk_rows(hidden.shape[0], hidden.shape[1], max_tokens)
    if len(chunks) == 1:
        return blocks(hidden, prompts)
    if prompts is None:
        prompts = torch.empty(0, dtype=hidden.dtype)
    return _ChunkedFunction.apply(hidden, prompts, blocks, chunks)


def _rows(prompts: torch.Tensor | None, start: int, end: int, batch: int) -> torch.Tensor | None:
    """The prompts of rows [start, end): per-row prompts are sliced, shared ones (batch dim 1) kept."""
    if prompts is None or prompts.shape[1] == 1 or prompts.shape[1] != batch:
        return prompts
    return prompts[:, start:end]


async def _gather(jobs: list[Any]) -> list[Any]:
    """Run the async callables at once; results in order. One failure cancels the rest and is raised as is."""
    results: list[Any] = [None] * len(jobs)

    async def run(i: int) -> None:
        results[i] = await jobs[i]()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(jobs)):
                nursery.start_soon(run, i)
    except BaseExceptionGroup as group:
        errors = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if errors:
            raise errors[0] from None
        raise
    return results


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


class _ChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor, blocks: RemoteBlocks,
                chunks: list[tuple[int, int]]) -> torch.Tensor:
        real = prompts.detach() if prompts.numel() else None
        batch = hidden.shape[0]
        pieces = [hidden.detach()[start:end] for start, end in chunks]
        jobs = [lambda piece=piece, s=s, e=e: blocks.aforward(piece, _rows(real, s, e, batch))
                for piece, (s, e) in zip(pieces, chunks)]
        results = blocks.swarm.node.call(_gather, jobs)
        ctx.blocks, ctx.chunks, ctx.traces, ctx.has_prompts = blocks, chunks, [t for _, t in results], real is not None
        ctx.batch = batch
        ctx.save_for_backward(prompts)
        return torch.cat([out for out, _ in results], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (prompts,) = ctx.saved_tensors
        blocks: RemoteBlocks = ctx.blocks
        real = prompts.detach() if ctx.has_prompts else None
        grad = grad.contiguous()
        jobs = [lambda trace=trace, s=s, e=e: blocks.abackward(trace, grad[s:e], _rows(real, s, e, ctx.batch))
                for trace, (s, e) in zip(ctx.traces, ctx.chunks)]
        results = blocks.swarm.node.call(_gather, jobs)
        grad_hidden = torch.cat([g for g, _ in results], dim=0)
        grad_prompts = None
        if real is not None:
            parts = [gp if gp is not None else torch.zeros_like(_rows(real, s, e, ctx.batch))
                     for (_, gp), (s, e) in zip(results, ctx.chunks)]
            per_row = real.shape[1] == ctx.batch and real.shape[1] != 1
            grad_prompts = torch.cat(parts, dim=1) if per_row else torch.stack(parts).sum(0)
        return grad_hidden, grad_prompts, None, None
