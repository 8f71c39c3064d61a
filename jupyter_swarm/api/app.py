"""The web application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (with SSE streaming).

FastAPI (on Starlette and pydantic): it validates requests against :mod:`.schemas`, streams server-sent events
from a generator, and lets every refusal be an OpenAI-style error body (``{"error": {"message", "type",
"param", "code"}}``), which the ``openai`` client turns into its own exceptions.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from jupyter_swarm.api.engine import DEFAULT_CHAT_TOKENS, DEFAULT_COMPLETION_TOKENS, Engine, Finished, Sampling
from jupyter_swarm.api.schemas import ChatCompletionRequest, CompletionRequest
from jupyter_swarm.errors import ConfigurationError, SwarmError


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(engine: Engine) -> Any:
    """The FastAPI application serving ``engine``'s model under ``/v1``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="jupyter-swarm OpenAI-compatible API", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{p.get('msg', '').removeprefix('Value error, ')}" for p in problems)
        return JSONResponse(ApiError(400, f"invalid request: {message}", param=where[0] if where else None).body(),
                            status_code=400)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(engine, name)
        return _model_card(engine)

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> Any:
        sampling = _sampling(engine, request, DEFAULT_COMPLETION_TOKENS)
        input_ids = engine.prompt_ids(request.prompt)
        return _respond(engine, request, input_ids, sampling, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest) -> Any:
        sampling = _sampling(engine, request, DEFAULT_CHAT_TOKENS)
        try:
            input_ids = engine.chat_ids(request.chat())
        except ConfigurationError as e:
            raise ApiError(400, str(e), param="messages") from None
        return _respond(engine, request, input_ids, sampling, chat=True)

    def _respond(engine: Engine, request: Any, input_ids: Any, sampling: Sampling, *, chat: bool) -> Any:
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if request.stream:
            events = _events(engine, input_ids, sampling, completion_id, chat,
                             bool((request.stream_options or {}).get("include_usage")))
            first = next(events)  # errors before the first byte still get a proper status code
            return StreamingResponse(_chain(first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finished = _collect(engine, input_ids, sampling)
        usage = _usage(finished)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finished.finish_reason, "logprobs": None}
            return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                    "model": engine.model_name, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "finish_reason": finished.finish_reason, "logprobs": None}
        return {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                "model": engine.model_name, "choices": [choice], "usage": usage}

    return app


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "jupyter-swarm"}


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.model_name:
        raise ApiError(404, f"the model {name!r} does not exist here; this API serves {engine.model_name!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")


def _sampling(engine: Engine, request: Any, default_tokens: int) -> Sampling:
    _check_model(engine, request.model)
    unsupported = request.unsupported_fields()
    if unsupported:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unsupported)}. This API supports model, "
                            "messages/prompt, max_tokens, temperature, top_p, stop, n=1, stream, seed",
                       param=next(iter(request.model_extra)))
    return Sampling(max_tokens=request.token_limit(default_tokens), temperature=request.temperature,
                    top_p=request.top_p, stop=request.stop, seed=request.seed)


def _usage(finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def _generate(engine: Engine, input_ids: Any, sampling: Sampling) -> Iterator[str | Finished]:
    try:
        yield from engine.stream(input_ids, sampling)
    except SwarmError as e:  # no server for some blocks, a server refused, the model is busy...
        raise ApiError(503, f"the swarm could not generate: {e}", kind="server_error") from e


def _collect(engine: Engine, input_ids: Any, sampling: Sampling) -> tuple[str, Finished]:
    pieces: list[str] = []
    for item in _generate(engine, input_ids, sampling):
        if isinstance(item, Finished):
            return "".join(pieces), item
        pieces.append(item)
    raise ApiError(500, "the generation ended without a result", kind="server_error")


def _events(engine: Engine, input_ids: Any, sampling: Sampling, completion_id: str, chat: bool,
            include_usage: bool) -> Iterator[bytes]:
    """Server-sent events: one chunk per text piece, a last chunk with the finish reason, then [DONE]."""
    created = int(time.time())

    def chunk(delta: str | None, finish_reason: str | None, usage: dict[str, int] | None = None) -> bytes:
        if chat:
            choices = [] if delta is None and finish_reason is None else [
                {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish_reason,
                 "logprobs": None}]
            data: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                    "model": engine.model_name, "choices": choices}
        else:
            choices = [] if delta is None and finish_reason is None else [
                {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}]
            data = {"id": completion_id, "object": "text_completion", "created": created,
                    "model": engine.model_name, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n".encode()

    items = _generate(engine, input_ids, sampling)
    first = next(items)  # before any byte is sent: a failure here is still an HTTP error
    if chat:
        head = json.loads(chunk("", None)[6:])
        head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield f"data: {json.dumps(head)}\n\n".encode()
    for item in _chain(first, items):
        if isinstance(item, Finished):
            yield chunk(None, item.finish_reason)
            if include_usage:
                yield chunk(None, None, _usage(item))
            break
        yield chunk(item, None)
    yield b"data: [DONE]\n\n"


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
