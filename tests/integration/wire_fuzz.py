"""A mutator over the typed wire messages, and a driver that fires its output at live servers.

:class:`WireFuzzer` makes valid messages of every protocol through the typed classes of ``jupyter_swarm.wire``,
then breaks most of them one to three ways: fields dropped, retyped, pushed to extreme values; tensor headers
(dtype, shape, compression) and bytes altered; the message type swapped; or the packed bytes flipped, cut or
replaced by garbage. :func:`fuzz_servers` sends them over every protocol (RPC, inference sessions, pushes into a
session, records, speed test) from one libp2p node and classifies every answer. A server passes when it stays
up, answers each request with a specific error (never the catch-all "server error" of a bug), and logs no
traceback. Used by ``tests/integration/test_fuzz.py`` (CI, 10^4 messages) and ``bench/bench_fuzz.py`` (10^5).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from jupyter_swarm.errors import ProtocolError, RemoteError, SwarmError
from jupyter_swarm.p2p.host import P2PNode
from jupyter_swarm.wire.inference import Open, PushTarget, Step
from jupyter_swarm.wire.messages import pack, unpack
from jupyter_swarm.wire.protocols import INFERENCE, PUSH, RECORDS, RPC, SPEEDTEST
from jupyter_swarm.wire.records import Get, Store
from jupyter_swarm.wire.rpc import Backward, Forward, Info
from jupyter_swarm.wire.tensor_fields import WireTensor
from jupyter_swarm.wire.tensors import Compression

ANSWER_TIMEOUT = 30.0
SHARES = {"rpc": 0.35, "inference": 0.35, "push": 0.2, "records": 0.08, "speedtest": 0.02}  # of the messages sent
NOBODY = "12D3KooWPGiD9iUYEr3m9cN1X7aEKHdfpsV8RrNK9Sm13qrwaetW"  # a well-formed peer id no one runs
WEIRD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 1.5, -0.0, math.nan, math.inf,
                           -math.inf, "", "x" * 300, "forward", b"", b"\x00" * 64, [], [1, 2, 3], [[[[[]]]]], {},
                           {"type": "step"}, {"dtype": "float32"}]
DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int64", "int8", "uint8", "bool", "complex64", "", 7]
COMPRESSIONS = [c.value for c in Compression] + ["zip", None, 3]


class WireFuzzer:
    """Valid messages of every protocol for a span of ``hidden_size``, mostly broken on purpose (seeded)."""

    def __init__(self, seed: int, hidden_size: int, num_blocks: int = 2, valid_share: float = 0.15):
        self.rng = random.Random(seed)
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.valid_share = valid_share
        generator = torch.Generator().manual_seed(seed)
        self._hidden = {(b, s): WireTensor.encode(torch.randn(b, s, hidden_size, generator=generator))
                        for b in (1, 2) for s in (1, 3)}

    # ---- valid messages (maps), one per protocol -------------------------------------------------------
    def _tensor(self, batch: int = 1, seq: int | None = None) -> WireTensor:
        return self._hidden[(batch, seq or self.rng.choice((1, 3)))]

    def rpc_message(self) -> dict[str, Any]:
        hidden = self._tensor(self.rng.choice((1, 2)))
        kind = self.rng.random()
        if kind < 0.1:
            return Info().to_wire()
        prompts = None
        if self.rng.random() < 0.2:
            prompts = WireTensor.encode(torch.zeros(self.num_blocks, 1, 1, self.hidden_size))
        if kind < 0.6:
            return Forward(hidden, prompts=prompts).to_wire()
        return Backward(hidden, prompts=prompts, grad_output=hidden).to_wire()

    def open_message(self, *, session_id: str | None = None, accept_from: str | None = None) -> dict[str, Any]:
        push_to = PushTarget(NOBODY, "next", ["/ip4/127.0.0.1/tcp/1"]) if self.rng.random() < 0.3 else None
        return Open(self.rng.choice((4, 16, 64)), self.rng.choice((1, 2)), session_id=session_id, push_to=push_to,
                    accept_from=accept_from).to_wire()

    def step_message(self, position: int, batch: int, *, session_id: str | None = None,
                     carry: int = 0) -> dict[str, Any]:
        hidden = self._tensor(batch, 1 if carry else None)
        step = Step(hidden, position, self.rng.choice([Compression.NONE, Compression.FLOAT16]),
                    push=carry > 0 or self.rng.random() < 0.3, session_id=session_id,
                    carry=[hidden] * carry if carry else None)
        if self.rng.random() < 0.1 and not carry:
            step.beam_idx = WireTensor.encode(torch.arange(batch - 1, -1, -1))
        return step.to_wire()

    def records_message(self) -> dict[str, Any]:
        if self.rng.random() < 0.5:
            return Get([f"fuzz.{self.rng.randrange(8)}" for _ in range(self.rng.randrange(1, 4))]).to_wire()
        return Store({f"fuzz.{self.rng.randrange(8)}": self.rng.randbytes(self.rng.randrange(64))},
                     self.rng.choice((1.0, 30.0))).to_wire()

    # ---- breaking them ---------------------------------------------------------------------------------
    def payload(self, message: dict[str, Any]) -> bytes:
        """``message`` packed, usually after one to three mutations."""
        if self.rng.random() < self.valid_share:
            return pack(message)
        message = _copy(message)
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            self._mutate_map(message)
        try:
            payload = pack(message)
        except (TypeError, ValueError, OverflowError):
            payload = self.rng.randbytes(self.rng.randrange(1, 256))
        if self.rng.random() < 0.15:
            payload = self._mutate_bytes(payload)
        return payload

    def _mutate_map(self, message: dict[str, Any]) -> None:
        target, key = self._pick(message)
        tensor = target.get(key) if isinstance(target, dict) else None
        choice = self.rng.random()
        if isinstance(tensor, dict) and "shape" in tensor and choice < 0.5:
            self._mutate_tensor(tensor)
        elif choice < 0.6 and isinstance(target, dict):
            target.pop(key, None)
        elif choice < 0.65:
            message["type"] = self.rng.choice(["forward", "backward", "info", "open", "step", "output", "store",
                                               "get", "found", "error", "", 5])
        elif choice < 0.7:
            message[self.rng.choice(["extra", "carry", "beam_idx", "prompts", "push_to", "session_id"])] = \
                self.rng.choice(WEIRD_VALUES)
        else:
            value = target.get(key) if isinstance(target, dict) else target[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and self.rng.random() < 0.5:
                target[key] = self.rng.choice([value + 1, value - 1, -value, value * 2, value * 1000])
            else:
                target[key] = self.rng.choice(WEIRD_VALUES)

    def _mutate_tensor(self, tensor: dict[str, Any]) -> None:
        what = self.rng.randrange(6)
        if what == 0:
            tensor["dtype"] = self.rng.choice(DTYPE_NAMES)
        elif what == 1:
            shape = list(tensor["shape"]) if isinstance(tensor["shape"], list) else []
            i = self.rng.randrange(len(shape)) if shape else 0
            op = self.rng.randrange(6)
            if op == 0 and shape:
                shape[i] = self.rng.choice([0, -1, shape[i] + 1, shape[i] * 2, 2**31, 2**40])
            elif op == 1:
                shape.append(self.rng.choice([1, 2, 0]))
            elif op == 2 and shape:
                shape.pop(i)
            elif op == 3:
                shape = shape[::-1]
            elif op == 4:
                shape = [*shape, *([1] * 8)]
            else:
                shape = self.rng.choice(WEIRD_VALUES)
            tensor["shape"] = shape
        elif what == 2:
            tensor["comp"] = self.rng.choice(COMPRESSIONS)
        elif what == 3:
            data = tensor.get("data", b"")
            data = data if isinstance(data, bytes) else b""
            tensor["data"] = self.rng.choice([data[:-1], data + b"\x00", data[: len(data) // 2], b"",
                                              bytes(b ^ 0xFF for b in data[:16]) + data[16:]])
        elif what == 4:
            tensor["scales"] = self.rng.choice([b"\x00" * 4, b"\xff" * 8, "no", []])
        else:
            # the same bytes under another header: a different dtype or compression of the same size
            tensor["dtype"], tensor["comp"] = self.rng.choice([("float16", "none"), ("int32", "none"),
                                                               ("float64", "float16"), ("float32", "bfloat16")])

    def _pick(self, message: dict[str, Any]) -> tuple[Any, Any]:
        """A random (container, key) inside ``message``, the top level most often."""
        target: Any = message
        key: Any = self.rng.choice(list(message)) if message else "type"
        while self.rng.random() < 0.4:
            value = target.get(key) if isinstance(target, dict) else target[key]
            if isinstance(value, dict) and value:
                target, key = value, self.rng.choice(list(value))
            elif isinstance(value, list) and value:
                target, key = value, self.rng.randrange(len(value))
            else:
                break
        return target, key

    def _mutate_bytes(self, payload: bytes) -> bytes:
        data = bytearray(payload)
        what = self.rng.randrange(4)
        if what == 0 and data:
            for _ in range(self.rng.randrange(1, 8)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        elif what == 1:
            data = data[: self.rng.randrange(len(data) + 1)]
        elif what == 2:
            data += self.rng.randbytes(self.rng.randrange(1, 64))
        else:
            data = bytearray(self.rng.randbytes(self.rng.randrange(1, 128)))
        return bytes(data)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ---- firing them at live servers --------------------------------------------------------------------------
@dataclass
class FuzzReport:
    """What the servers answered: per protocol, messages sent; per kind, answers (ok, refused, closed)."""

    sent: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    bugs: list[str] = field(default_factory=list)  # "server error" replies: a handler raised something unexpected

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def note_reply(self, payload: bytes) -> dict[str, Any] | None:
        try:
            message = unpack(payload)
        except RemoteError as e:
            text = str(e)
            if text.startswith("server error"):
                self.bugs.append(text)
            self.answers["refused"] += 1
            return None
        except ProtocolError:
            self.answers["unreadable"] += 1
            return None
        self.answers[f"ok:{message['type']}"] += 1
        return message


async def fuzz_servers(node: P2PNode, servers: list[str], fuzzer: WireFuzzer, count: int) -> FuzzReport:
    """Send ``count`` fuzzed messages across every protocol to ``servers`` (round robin) and classify answers."""
    report = FuzzReport()
    budget = {protocol: round(count * share) for protocol, share in SHARES.items()}
    budget["rpc"] += count - sum(budget.values())

    def take(protocol: str) -> bool:
        if budget[protocol] <= 0:
            return False
        budget[protocol] -= 1
        report.sent[protocol] += 1
        return True

    async def rpc_worker(server: str) -> None:
        while budget["rpc"] > 0:
            stream = await node.open_stream(server, RPC)
            try:
                for _ in range(200):
                    if not take("rpc"):
                        return
                    await stream.send(fuzzer.payload(fuzzer.rpc_message()))
                    with trio.fail_after(ANSWER_TIMEOUT):
                        report.note_reply(await stream.recv())
            except SwarmError:
                report.answers["closed"] += 1  # e.g. an over-limit frame: the server says so and stops reading
            finally:
                await stream.close()

    async def session_worker(server: str) -> None:
        while budget["inference"] > 0:
            stream = await node.open_stream(server, INFERENCE)
            try:
                if not take("inference"):
                    return
                opening = fuzzer.open_message()
                await stream.send(fuzzer.payload(opening))
                with trio.fail_after(ANSWER_TIMEOUT):
                    if report.note_reply(await stream.recv()) is None:
                        continue
                position = 0
                for _ in range(fuzzer.rng.randrange(4, 40)):
                    if not take("inference"):
                        return
                    batch = opening["batch_size"] if fuzzer.rng.random() < 0.8 else 1
                    await stream.send(fuzzer.payload(fuzzer.step_message(position, batch)))
                    with trio.fail_after(ANSWER_TIMEOUT):
                        reply = report.note_reply(await stream.recv())
                    if reply is not None and isinstance(reply.get("position"), int):
                        position = reply["position"]
            except SwarmError:
                report.answers["closed"] += 1
            finally:
                await stream.close()

    async def push_worker(server: str) -> None:
        """Pushes into a session of our own (we name ourselves its previous server), so they reach the step code."""
        session_id = f"fuzz{fuzzer.rng.randrange(10**6)}"
        while budget["push"] > 0:
            stream = await node.open_stream(server, INFERENCE)
            pusher = None
            try:
                if not take("push"):
                    return
                await stream.send(pack(fuzzer.open_message(session_id=session_id, accept_from=node.peer_id)))
                with trio.fail_after(ANSWER_TIMEOUT):
                    opened = report.note_reply(await stream.recv())
                if opened is None:
                    continue
                pusher = await node.open_stream(server, PUSH)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, stream, report)
                    for _ in range(100):
                        if not take("push"):
                            break
                        await pusher.send(fuzzer.payload(fuzzer.step_message(
                            0, 1, session_id=session_id, carry=fuzzer.rng.randrange(3))))
                        await trio.sleep(0)
                    await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            except SwarmError:
                report.answers["closed"] += 1
            finally:
                if pusher is not None:
                    await pusher.close()
                await stream.close()

    async def records_worker(server: str) -> None:
        while take("records"):
            try:
                reply = await node.request(server, RECORDS, fuzzer.payload(fuzzer.records_message()), ANSWER_TIMEOUT)
                report.note_reply(reply)
            except SwarmError:
                report.answers["closed"] += 1

    async def speedtest_worker(server: str) -> None:
        stream = await node.open_stream(server, SPEEDTEST)
        try:
            while take("speedtest"):
                await stream.send(fuzzer.rng.randbytes(fuzzer.rng.randrange(0, 2048)))
                with trio.fail_after(ANSWER_TIMEOUT):
                    report.note_reply(await stream.recv())
        finally:
            await stream.close()

    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(speedtest_worker, server)
            for _ in range(2):
                nursery.start_soon(rpc_worker, server)
                nursery.start_soon(session_worker, server)
            nursery.start_soon(push_worker, server)
            nursery.start_soon(records_worker, server)
    return report


async def _drain(stream: Any, report: FuzzReport) -> None:
    try:
        while True:
            report.note_reply(await stream.recv())
    except SwarmError:
        pass
