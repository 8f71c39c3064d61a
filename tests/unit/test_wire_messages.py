"""The typed messages of every protocol: each round-trips, and each refuses what a hostile peer could send
before any tensor is decoded."""

from __future__ import annotations

import math

import pytest
import torch

from jupyter_swarm.errors import InvalidRequestError, ProtocolError, RemoteError, ServerBusyError, SessionEvictedError
from jupyter_swarm.wire import tensors
from jupyter_swarm.wire.inference import Open, Opened, Output, PushTarget, Step
from jupyter_swarm.wire.messages import ErrorReply, decode, decode_any, error_message, pack
from jupyter_swarm.wire.protocols import MAX_RELAY_SPANS, RELAY_MAX_TOKENS
from jupyter_swarm.wire.records import Found, Get, Store, Stored
from jupyter_swarm.wire.rpc import Backward, BackwardResult, Forward, ForwardResult, Info, InfoResult
from jupyter_swarm.wire.speedtest import Received
from jupyter_swarm.wire.tensor_fields import SpanLimits, WireTensor
from jupyter_swarm.wire.tensors import Compression

H = 16
LIMITS = SpanLimits(hidden_size=H, dtype=torch.float32, start=2, end=5)


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> WireTensor:
    return WireTensor.encode(torch.randn(*shape).to(dtype))


def _roundtrip(message, **context):
    return decode(message.encode(), type(message), **context)


def test_every_message_round_trips():
    hidden = _t(2, 3, H)
    step = _roundtrip(Step(hidden, 7, Compression.FLOAT16, beam_idx=WireTensor.encode(torch.tensor([1, 0])),
                           prompts=_t(3, 1, 2, H)), limits=LIMITS)
    assert step.position == 7 and step.compression == Compression.FLOAT16 and step.hidden.shape == (2, 3, H)
    assert torch.equal(step.hidden.decode(), hidden.decode()) and step.beam_idx.decode().tolist() == [1, 0]
    relayed = _roundtrip(Step(_t(1, 1, H), 0, push=True, session_id="s1", carry=[_t(1, 1, H)]), limits=LIMITS)
    assert relayed.push and relayed.session_id == "s1" and len(relayed.carry) == 1
    opening = _roundtrip(Open(32, 2, 2, 4, "lora", "me", PushTarget("peer", "next", ["/ip4/1.2.3.4/tcp/1"]), "prev"))
    assert (opening.max_length, opening.batch_size, opening.start, opening.end) == (32, 2, 2, 4)
    assert opening.push_to == PushTarget("peer", "next", ["/ip4/1.2.3.4/tcp/1"]) and opening.accept_from == "prev"
    assert _roundtrip(Opened(32)).max_length == 32
    output = _roundtrip(Output(_t(1, 1, H), 5, carry=[_t(1, 1, H)] * 2), shape=(1, 1, H))
    assert output.position == 5 and len(output.carry) == 2
    forward = _roundtrip(Forward(_t(1, 4, H), 2, 4, prompts=_t(2, 1, 3, H)), limits=LIMITS)
    assert (forward.start, forward.end) == (2, 4) and forward.prompts.shape == (2, 1, 3, H)
    backward = _roundtrip(Backward(_t(1, 4, H), grad_output=_t(1, 4, H)), limits=LIMITS)
    assert isinstance(backward, Backward) and backward.grad_output.shape == (1, 4, H)
    assert _roundtrip(ForwardResult(_t(1, 4, H)), shape=(1, 4, H)).hidden.shape == (1, 4, H)
    result = _roundtrip(BackwardResult(_t(1, 4, H), _t(3, 1, 2, H)), shape=(1, 4, H), prompts_shape=(3, 1, 2, H))
    assert result.grad_prompts.shape == (3, 1, 2, H)
    assert isinstance(decode_any(Info().encode(), (Forward, Backward, Info), limits=LIMITS), Info)
    assert _roundtrip(InfoResult(2, 5, "float32", "nf4", 100)) == InfoResult(2, 5, "float32", "nf4", 100)
    assert _roundtrip(Store({"k": b"v"}, 10.0)) == Store({"k": b"v"}, 10.0)
    assert _roundtrip(Stored()) == Stored()
    assert _roundtrip(Get(["a", "b"])) == Get(["a", "b"])
    assert _roundtrip(Found({"a": {"p": (b"v", 3.0)}}), keys=["a"]) == Found({"a": {"p": (b"v", 3.0)}})
    assert _roundtrip(Received(12)) == Received(12)


def test_error_replies_raise_what_the_client_acts_on():
    with pytest.raises(RemoteError, match="boom") as info:
        decode(error_message("boom", invalid_request=True), Output, shape=(1,))
    assert info.value.invalid_request
    with pytest.raises(SessionEvictedError, match="freed"):
        decode(ErrorReply("freed", reason=ErrorReply.EVICTED).encode(), Output, shape=(1,))
    with pytest.raises(ServerBusyError, match="full"):
        decode(ErrorReply("full", reason=ErrorReply.BUSY).encode(), Output, shape=(1,))


def _raw(kind: str, **fields) -> bytes:
    return pack({"type": kind, **fields})


def _enc(tensor: torch.Tensor) -> dict:
    return tensors.encode_tensor(tensor)


GOOD_HIDDEN = _enc(torch.zeros(1, 2, H))
HOSTILE_REQUESTS = [
    (_raw("step", position=0), "lacks the field 'hidden'"),
    (_raw("step", hidden=GOOD_HIDDEN, position=-1), "'position' must be in"),
    (_raw("step", hidden=GOOD_HIDDEN, position=True), "'position' must be int"),
    (_raw("step", hidden=_enc(torch.zeros(1, 2, H + 1)), position=0), "must have shape"),
    (_raw("step", hidden=_enc(torch.zeros(1, 2, H, dtype=torch.float64)), position=0), "float32"),
    (_raw("step", hidden=_enc(torch.zeros(300, 1, H)), position=0), "exceed"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, compression="zip"), "unknown compression"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, beam_idx=_enc(torch.tensor([0.5]))), "beam_idx must be"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, prompts=_enc(torch.zeros(2, 1, 2, H))), "prompts must have"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, carry=[1, 2]), "carry must be a list"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, carry=[GOOD_HIDDEN] * MAX_RELAY_SPANS), "carry must be a list"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, carry=[_enc(torch.zeros(1, 3, H))]), "carry[0] shape"),
    (_raw("step", hidden=_enc(torch.zeros(1, RELAY_MAX_TOKENS + 1, H)), position=0, push=True), "a relayed step"),
    (_raw("step", hidden=GOOD_HIDDEN, position=0, session_id="x" * 65), "'session_id' must be 1..64"),
    (_raw("step", hidden={"dtype": "float32", "shape": [10**9, 10**9, H], "data": b""}, position=0), "shape"),
    (_raw("step", hidden={"dtype": "float32", "shape": [1, 2, H], "data": b"short"}, position=0), "bytes"),
    (_raw("step", hidden={"dtype": "float32", "shape": [1.5, 2, H], "data": b""}, position=0), "integers"),
    (_raw("step", hidden={"dtype": "float32", "shape": [1] * 9, "data": b""}, position=0), "at most 8"),
    (_raw("step", hidden={"dtype": ["x"], "shape": [1], "data": b""}, position=0), "malformed tensor"),
]


@pytest.mark.parametrize("payload, expected", HOSTILE_REQUESTS)
def test_hostile_steps_are_refused_with_the_reason(payload, expected):
    with pytest.raises(ProtocolError) as info:
        decode(payload, Step, limits=LIMITS)
    assert expected in str(info.value)


HOSTILE_OTHERS = [
    (_raw("open", max_length=0, batch_size=1), Open, "'max_length' must be in"),
    (_raw("open", max_length=8, batch_size=10**6), Open, "'batch_size' must be in"),
    (_raw("open", max_length=8, batch_size=1, start=3, end=3), Open, "are empty"),
    (_raw("open", max_length=8, batch_size=1, push_to={"peer_id": "p", "session_id": "s", "addrs": [5]}), Open,
     "multiaddr strings"),
    (_raw("forward", hidden=_enc(torch.zeros(1, 2, H)), start=2, end=4, prompts=_enc(torch.zeros(3, 1, 1, H))),
     Forward, "prompts must have shape [2,"),
    (_raw("backward", hidden=GOOD_HIDDEN), Backward, "lacks the field 'grad_output'"),
    (_raw("backward", hidden=GOOD_HIDDEN, grad_output=_enc(torch.zeros(1, 3, H))), Backward, "grad_output shape"),
    (_raw("store", values={}, ttl=1.0), Store, "1..256 keys"),
    (_raw("store", values={"k": b"v"}, ttl=math.nan), Store, "finite number"),
    (_raw("store", values={"k": b"v"}, ttl=math.inf), Store, "finite number"),
    (_raw("store", values={"k": b"v"}, ttl=0), Store, "positive"),
    (_raw("store", values={"k": "text"}, ttl=1.0), Store, "must be bytes"),
    (_raw("store", values={"k" * 300: b"v"}, ttl=1.0), Store, "1..256 characters"),
    (_raw("get", keys=[1]), Get, "must be a string"),
    (_raw("get", keys=["k"] * 2000), Get, "at most 1024 items"),
    (_raw("found", records={"k": {"p": [b"v", math.nan]}}), Found, "finite number"),
    (_raw("found", records={"k": {"p": [b"v"]}}), Found, "[value, ttl]"),
    (_raw("found", records={"other": {}}), Found, "not asked for"),
]


@pytest.mark.parametrize("payload, kind, expected", HOSTILE_OTHERS)
def test_hostile_requests_of_every_protocol_are_refused_with_the_reason(payload, kind, expected):
    with pytest.raises(ProtocolError) as info:
        decode(payload, kind, limits=LIMITS, keys=["k"], shape=(1, 2, H))
    assert expected in str(info.value)


def test_replies_are_checked_against_the_request():
    with pytest.raises(InvalidRequestError, match="output shape"):
        decode(Output(_t(1, 2, H), 2).encode(), Output, shape=(1, 1, H))
    with pytest.raises(InvalidRequestError, match="carry"):
        decode(Output(_t(1, 1, H), 2, carry=[_t(2, 1, H)]).encode(), Output, shape=(1, 1, H))
    with pytest.raises(InvalidRequestError, match="without prompts"):
        decode(BackwardResult(_t(1, 1, H), _t(1, 1, 1, H)).encode(), BackwardResult, shape=(1, 1, H))


def test_headers_are_checked_before_any_tensor_is_allocated(monkeypatch):
    """A hostile shape fails on its header: decode_tensor (the only place that allocates) is never reached."""
    def no_decoding(obj):
        raise AssertionError("decoded a tensor whose header should have been refused")

    monkeypatch.setattr("jupyter_swarm.wire.tensor_fields.decode_tensor", no_decoding)
    for payload, _ in HOSTILE_REQUESTS:
        with pytest.raises(ProtocolError):
            decode(payload, Step, limits=LIMITS)
    # an 8-bit tensor that would expand 4x to float32, and a float16 one that would expand to float64: their byte
    # counts are right, so only the header checks stand between them and the allocation
    too_long = tensors.encode_tensor(torch.zeros(1, LIMITS.max_tokens + 1, H), Compression.BLOCKWISE_8BIT)
    with pytest.raises(InvalidRequestError, match="exceed"):
        decode(_raw("step", hidden=too_long, position=0), Step, limits=LIMITS)
    as_float64 = {**tensors.encode_tensor(torch.zeros(1, 2, H), Compression.FLOAT16), "dtype": "float64"}
    with pytest.raises(InvalidRequestError, match="must be torch.float32"):
        decode(_raw("step", hidden=as_float64, position=0), Step, limits=LIMITS)


def test_frame_limits_follow_what_the_span_can_use():
    big = SpanLimits(hidden_size=8192, dtype=torch.float16, start=0, end=80)
    small = SpanLimits(hidden_size=64, dtype=torch.float32, start=0, end=2)
    assert small.push_frame_bytes() < 1 * 2**20  # a relayed step of a small model: well under a megabyte
    assert small.rpc_frame_bytes() < 20 * 2**20
    assert big.push_frame_bytes() < 64 * 2**20
    assert big.rpc_frame_bytes() == 512 * 2**20  # capped
