"""Where a server places its span: the blocks with the least throughput, and when to move (Petals' rules, plus one).

Pure functions over plain spans, shared by the server runtime and by ``bench/sim_swarm.py``:

* :func:`block_throughputs` sums, per block, the throughput of every joining or online server that holds it.
* :func:`choose_best_start` starts a new span at the window whose sorted throughputs are lexicographically
  smallest (the weakest blocks first, then the next weakest...).
* :func:`should_move` simulates this server moving to its best start and the others greedily re-placing
  themselves, and says to move when the swarm's bottleneck (its least-served block) would rise enough:
  ``current / after < balance_quality``. Unlike Petals it never moves a server when that alone would leave a
  block that is covered now uncovered, so a move never opens a gap in coverage.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jupyter_swarm.dht.records import ServerRecord, ServerState

BALANCE_QUALITY = 0.75
_EPS = 1e-3


@dataclass
class Placement:
    """One server's span and its per-block throughput, as block selection sees it."""

    peer_id: str
    start: int
    end: int
    throughput: float

    @property
    def length(self) -> int:
        return self.end - self.start


def placements(records: Iterable[ServerRecord],
               states: tuple[ServerState, ...] = (ServerState.JOINING, ServerState.ONLINE)) -> dict[str, Placement]:
    """The spans of servers in ``states`` (joining servers count: they are about to serve).

    A server that is moving counts twice: at its old span, which it still serves, and at its target (keyed
    ``peer_id + "->"``), which it soon will, so that nobody else rushes into the same hole meanwhile.
    """
    out: dict[str, Placement] = {}
    for r in records:
        if r.state in states:
            out[r.peer_id] = Placement(r.peer_id, r.start, r.end, max(0.0, r.throughput))
            if r.moving_to is not None:
                length = r.end - r.start
                out[r.peer_id + "->"] = Placement(r.peer_id + "->", r.moving_to, r.moving_to + length,
                                                  max(0.0, r.throughput))
    return out


def block_throughputs(spans: Iterable[Placement], num_blocks: int) -> list[float]:
    """Total throughput per block."""
    return _throughputs(spans, num_blocks).tolist()


def _throughputs(spans: Iterable[Placement], num_blocks: int) -> np.ndarray:
    totals = np.zeros(num_blocks + 1)
    for p in spans:
        lo, hi = max(0, p.start), min(num_blocks, p.end)
        if lo < hi:
            totals[lo] += p.throughput
            totals[hi] -= p.throughput
    return np.cumsum(totals[:-1])


def choose_best_start(throughputs: Sequence[float] | np.ndarray, length: int) -> int:
    """Start of the window of ``length`` blocks whose sorted throughputs are lexicographically smallest
    (the first such window on ties)."""
    values = np.asarray(throughputs, dtype=np.float64)
    length = min(length, len(values))
    if length <= 0:
        return 0
    windows = np.sort(sliding_window_view(values, length), axis=1)
    return int(np.lexsort(windows.T[::-1])[0])  # lexsort's last key is the primary one: column 0


def choose_span(records: Iterable[ServerRecord], num_blocks: int, length: int,
                exclude: str | None = None) -> tuple[int, int]:
    """The span [start, end) a new server of ``length`` blocks should take in this swarm."""
    spans = [p for p in placements(records).values() if p.peer_id != exclude]
    length = max(1, min(length, num_blocks))
    start = choose_best_start(block_throughputs(spans, num_blocks), length)
    return start, start + length


def bottleneck(spans: Iterable[Placement], num_blocks: int) -> float:
    """The swarm's throughput: that of its least-served block (0 when a block is uncovered)."""
    return min(block_throughputs(spans, num_blocks), default=0.0)


def _opens_gap(spans: dict[str, Placement], peer_id: str, new_start: int, num_blocks: int) -> bool:
    """Would moving ``peer_id`` alone to ``new_start`` leave some currently covered block uncovered?"""
    me = spans[peer_id]
    before = [0] * num_blocks
    for p in spans.values():
        for b in range(p.start, min(p.end, num_blocks)):
            before[b] += 1
    after = list(before)
    for b in range(me.start, min(me.end, num_blocks)):
        after[b] -= 1
    for b in range(new_start, min(new_start + me.length, num_blocks)):
        after[b] += 1
    return any(was > 0 and now == 0 for was, now in zip(before, after))


def missing_blocks(records: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """Blocks no joining, online or moving server will hold."""
    return [b for b, t in enumerate(_throughputs(placements(records).values(), num_blocks)) if t <= 0]


def should_move(peer_id: str, records: Iterable[ServerRecord], num_blocks: int, *,
                balance_quality: float = BALANCE_QUALITY, rng: random.Random | None = None,
                holes_only: bool = False) -> int | None:
    """The start this server should move its span to, or None to stay.

    Petals' test: take this server out, put it at its best start, let every server greedily re-place itself
    until none moves, and compare the bottlenecks. Moving is worth it when ``before / after < balance_quality``;
    a move that would uncover a block that is covered now is never made. While some block is uncovered, a move
    that covers more blocks (and uncovers none) is made at once. ``holes_only``: only that check (it is cheap,
    so servers make it at every refresh and holes close quickly).
    """
    rng = rng or random.Random()
    spans = placements(records)
    if peer_id not in spans or peer_id + "->" in spans:
        return None  # not placed yet, or already moving
    spans = {k: Placement(v.peer_id, v.start, v.end, v.throughput) for k, v in spans.items()}
    throughputs = _throughputs(spans.values(), num_blocks)
    initial = float(throughputs.min())
    eps = _EPS * max(float(throughputs.max()), 1e-9)
    me = spans[peer_id]
    ideal = sum(p.throughput * p.length for p in spans.values()) / max(1, num_blocks)  # no placement beats this
    if initial >= eps and (holes_only or initial / max(ideal, 1e-12) >= balance_quality - _EPS):
        return None  # even a perfect re-placement of everyone could not gain enough

    def take_out(p: Placement, scale: float) -> None:
        throughputs[p.start:p.end] -= p.throughput * scale

    take_out(me, 1 + _EPS)
    new_start = choose_best_start(throughputs, me.length)
    take_out(me, -_EPS)
    if new_start == me.start or _opens_gap(spans, peer_id, new_start, num_blocks):
        take_out(me, -1)
        return None
    if initial < eps:  # a block is uncovered now: move if that alone covers more blocks (and uncovers none)
        missing_before = sum(1 for t in block_throughputs(spans.values(), num_blocks) if t <= eps)
        trial = dict(spans)
        trial[peer_id] = Placement(peer_id, new_start, new_start + me.length, me.throughput)
        missing_after = sum(1 for t in block_throughputs(trial.values(), num_blocks) if t <= eps)
        if missing_after < missing_before:
            return new_start
        if holes_only:
            return None
    me.start, me.end = new_start, new_start + me.length
    take_out(me, -1)

    for _ in range(100):  # greedy re-placement of everyone (bounded: it nearly always settles in a few rounds)
        moved = False
        order = list(spans)
        rng.shuffle(order)
        for pid in order:
            p = spans[pid]
            take_out(p, 1 + _EPS)
            start = choose_best_start(throughputs, p.length)
            take_out(p, -_EPS)
            if start != p.start:
                p.start, p.end = start, start + p.length
                moved = True
            take_out(p, -1)
        if not moved:
            break
    after = float(throughputs.min())
    if after < initial or after < eps:
        return None
    return new_start if initial / after < balance_quality - _EPS else None


def span_length_for_memory(memory_bytes: int, block_bytes: int, cache_bytes_per_block: int, num_blocks: int) -> int:
    """How many blocks fit in ``memory_bytes``: weights plus this server's attention cache for each block."""
    per_block = max(1, block_bytes + cache_bytes_per_block)
    return max(1, min(num_blocks, memory_bytes // per_block))
