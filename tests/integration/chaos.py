"""The chaos soak: generate non-stop through a swarm while servers are SIGKILLed at random points.

Servers are real `jupyter-swarm serve` processes forked by a zygote (``server_zygote.py``), so a kill and its
replacement cost about 0.2 s of CPU instead of seconds. A killer thread SIGKILLs a random server (most often one
on the chain the current generation uses) every few tokens, as long as another ready server holds the same span,
and forks a replacement at once. Like a real swarm, this one has a long-lived bootstrap peer
that everyone joins through (here a server of a one-block model nobody uses; it is never killed), and a server
lives at least ``min_age`` seconds: when the whole population turns over faster than the map refreshes, no
client could keep track of it. Generations alternate between relayed steps and client-driven
ones; every generation must produce exactly the tokens of a local run. The soak records every token's arrival,
so it can report how long tokens stalled.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from jupyter_swarm import AutoDistributedModelForCausalLM
from tests.integration.server_zygote import ForkedServer, Zygote

SERVER_ARGS = ["--torch-threads", "1", "--update-period", "2", "--throughput", "10", "--bandwidth-mbps", "1000",
               "--balance-period", "0"]


@dataclass
class SoakResult:
    """What a soak did and saw."""

    kills: int = 0
    kills_during_generation: dict[str, int] = field(default_factory=lambda: {"relayed": 0, "client-driven": 0})
    generations: dict[str, int] = field(default_factory=lambda: {"relayed": 0, "client-driven": 0})
    mismatches: list[str] = field(default_factory=list)
    token_gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens of a generation
    first_token: list[float] = field(default_factory=list)  # seconds from generate() to its first new token
    kill_stalls: list[float] = field(default_factory=list)  # per kill during a generation: the gap it fell in
    _kill_times: list[float] = field(default_factory=list)
    _timelines: list[list[float]] = field(default_factory=list)  # per generation: its start, then each token
    failovers: int = 0
    servers_started: int = 0
    failed_starts: list[str] = field(default_factory=list)  # the last line of each server that exited unready
    startup: list[float] = field(default_factory=list)  # seconds from fork to "ready" of replacement servers
    seconds: float = 0.0

    def percentiles(self, values: Sequence[float]) -> tuple[float, float, float]:
        ordered = sorted(values)
        if not ordered:
            return (0.0, 0.0, 0.0)
        return (statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], ordered[-1])

    def measure_kill_stalls(self) -> None:
        """For each kill that fell inside a generation: the time between the token before it and the token after
        it (for a kill before the first token: from the generate() call to the first token)."""
        for kill in self._kill_times:
            for timeline in self._timelines:
                if timeline[0] <= kill < timeline[-1]:
                    after = next(i for i, t in enumerate(timeline) if t > kill)
                    self.kill_stalls.append(timeline[after] - timeline[after - 1])
                    break

    def summary(self) -> str:
        k50, k99, kmax = self.percentiles(self.kill_stalls)
        p50, p99, worst = self.percentiles(self.token_gaps)
        f50, f99, fmax = self.percentiles(self.first_token)
        total = sum(self.generations.values())
        return (f"{self.kills} SIGKILLs ({self.kills_during_generation['relayed']} during relayed and "
                f"{self.kills_during_generation['client-driven']} during client-driven generation), "
                f"{self.servers_started} servers started, {total} generations ({self.generations['relayed']} relayed, "
                f"{self.generations['client-driven']} client-driven), {self.failovers} failovers, "
                f"{len(self.failed_starts)} servers exited before ready (replaced), "
                f"{total - len(self.mismatches)}/{total} identical to local, {self.seconds:.0f} s\n"
                f"stall at a kill (the gap between tokens it fell in, {len(self.kill_stalls)} kills): "
                f"p50 {1000 * k50:.0f} ms, p99 {1000 * k99:.0f} ms, max {1000 * kmax:.0f} ms\n"
                f"gap between tokens: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.0f} ms, max {1000 * worst:.0f} ms "
                f"({len(self.token_gaps)} gaps); first token: p50 {1000 * f50:.0f} ms, p99 {1000 * f99:.0f} ms, "
                f"max {1000 * fmax:.0f} ms; replacement servers ready after p50 {statistics.median(self.startup or [0]):.2f} s, "
                f"max {max(self.startup or [0]):.2f} s")


class _Swarm:
    """The live servers of each span, killed and replaced by the killer thread."""

    def __init__(self, zygote: Zygote, model: str, spans: Sequence[tuple[int, int]], per_span: int):
        self.zygote, self.model = zygote, model
        self.servers: list[ForkedServer] = []  # not killed (some still starting)
        self.killed: list[ForkedServer] = []
        self.lock = threading.Lock()
        self.bootstrap = zygote.fork(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--stop-with-parent"])
        self.bootstrap.wait_ready()
        for span in spans:
            for _ in range(per_span):
                self.replace(span)
        for server in list(self.servers):
            server.wait_ready()
        self.initial = list(self.servers)

    def __enter__(self) -> "_Swarm":
        return self

    def __exit__(self, *exc: object) -> None:
        for server in [*self.servers, self.bootstrap]:
            server.kill()

    def ready(self) -> list[ForkedServer]:
        return [s for s in self.servers if s.poll_ready() and s.alive]

    def initial_peers(self) -> list[str]:
        return [*self.bootstrap.addrs[:1], *(a for s in self.ready()[-2:] for a in s.addrs[:1])]

    def kill(self, victim: ForkedServer) -> None:
        victim.kill()
        self.servers.remove(victim)
        self.killed.append(victim)

    def replace_failed_starts(self) -> list[str]:
        """Fork a replacement for each server that exited before it was ready (a swarm operator restarts a server
        that failed to join); returns their last log lines."""
        failed = [s for s in self.servers if not s.alive and not s.poll_ready()]
        for server in failed:
            self.servers.remove(server)
            self.replace((server.start_block, server.end_block))
        return [(s.log.read_text().strip().splitlines() or ["(no output)"])[-1][:300] for s in failed]

    def replace(self, span: tuple[int, int]) -> ForkedServer:
        server = self.zygote.fork_server(self.model, *span, [*SERVER_ARGS, "--initial-peers", *self.initial_peers()])
        self.servers.append(server)
        return server


def run_soak(zygote: Zygote, model_path: str, expected: Callable[[torch.Tensor, int], list[int]], *, kills: int,
             spans: Sequence[tuple[int, int]] = ((0, 2), (2, 4)), per_span: int = 3, min_age: float = 1.0,
             max_new_tokens: int = 24, tokens_between_kills: tuple[int, int] = (1, 12),
             prompts: Sequence[torch.Tensor] = (), seed: int = 0, on_chain: float = 0.85,
             log: Callable[[str], None] = lambda line: None) -> SoakResult:
    """Generate until ``kills`` servers were SIGKILLed; ``expected(prompt, n)``: the local run's tokens. The servers
    are forked by ``zygote`` (and killed at the end).

    Kill points: after a random number of tokens (``tokens_between_kills``) since the last kill, plus a random delay
    of up to a few milliseconds (so a kill lands anywhere in a step: sending, computing, pushing, answering), the
    killer SIGKILLs a server, of the chain in use with probability ``on_chain``."""
    rng = random.Random(seed)
    prompts = list(prompts) or [torch.tensor([[1, 17, 42, 99, 7]]), torch.tensor([[1, 250, 33, 18]])]
    result = SoakResult()
    began = time.monotonic()
    tokens = _TokenCount()
    with _Swarm(zygote, model_path, spans, per_span) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers(),
                                                                wait_for_coverage=30.0)
        state: dict[str, str | None] = {"mode": None}
        stop = threading.Event()

        def choose_victim() -> ForkedServer | None:
            now = time.monotonic()
            ready = swarm.ready()
            session = model.active_session
            chain = {r.peer_id for r in session.routes} if session is not None else set()

            def has_spare(s: ForkedServer) -> bool:
                return sum(1 for o in ready if (o.start_block, o.end_block) == (s.start_block, s.end_block)) > 1

            spare = [s for s in ready if now - s.ready_at >= min_age and has_spare(s)]  # type: ignore[operator]
            on_route = [s for s in spare if s.peer_id in chain]
            pool = on_route if on_route and rng.random() < on_chain else spare
            return rng.choice(pool) if pool else None

        def kill_loop() -> None:
            next_at = rng.randint(*tokens_between_kills)
            while not stop.is_set() and result.kills < kills:
                with swarm.lock:
                    result.failed_starts += swarm.replace_failed_starts()
                if not tokens.wait_for(next_at, timeout=0.5):
                    continue
                time.sleep(rng.uniform(0, 0.006))
                with swarm.lock:
                    victim = choose_victim()
                    if victim is not None:
                        swarm.kill(victim)
                        result._kill_times.append(time.perf_counter())
                        result.kills += 1
                        mode = state["mode"]
                        if mode is not None:
                            result.kills_during_generation[mode] += 1
                        swarm.replace((victim.start_block, victim.end_block))
                        result.servers_started += 1
                if victim is None:  # no spare server yet: try again in a moment
                    time.sleep(0.02)
                    continue
                next_at = tokens.count + rng.randint(*tokens_between_kills)

        killer = threading.Thread(target=kill_loop, name="chaos-killer", daemon=True)
        killer.start()
        try:
            n = 0
            while result.kills < kills:
                prompt = prompts[n % len(prompts)]
                mode = "relayed" if n % 2 == 0 else "client-driven"
                model.swarm.push = mode == "relayed"
                times: list[float] = []
                state["mode"] = mode
                started = time.perf_counter()
                with model.inference_session(max_length=prompt.shape[1] + max_new_tokens) as session:
                    got = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                         streamer=_Clock(times, tokens))
                    result.failovers += session.failovers
                state["mode"] = None
                result.generations[mode] += 1
                result._timelines.append([started, *times])
                if times:
                    result.first_token.append(times[0] - started)
                    result.token_gaps.extend(b - a for a, b in zip(times, times[1:]))
                want = expected(prompt, max_new_tokens)
                if got[0].tolist() != want:
                    result.mismatches.append(f"generation {n} ({mode}): got {got[0].tolist()}, expected {want}")
                n += 1
                if n % 50 == 0:
                    log(f"{n} generations, {result.kills} kills, {result.failovers} failovers")
        finally:
            stop.set()
            killer.join(10)
            model.close()
            result.startup = [s.ready_at - s.started_at for s in swarm.killed + swarm.servers
                              if s not in swarm.initial and s.ready_at is not None]
    result.seconds = time.monotonic() - began
    result.measure_kill_stalls()
    return result


class _TokenCount:
    """Tokens generated so far (all generations), which the killer waits on."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_for(self, target: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= target, timeout)


class _Clock:
    """A generate() streamer that records when each new token arrives."""

    def __init__(self, times: list[float], tokens: _TokenCount):
        self.times, self.tokens = times, tokens
        self._prompt = True

    def put(self, value: object) -> None:
        if self._prompt:  # generate() first hands over the prompt
            self._prompt = False
            return
        self.times.append(time.perf_counter())
        self.tokens.add()

    def end(self) -> None:
        pass
