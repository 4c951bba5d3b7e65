"""The HTTP routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``, ``GET /health``.

Each chat request is read within the body limit, parsed and its image decoded off the event loop
(:func:`m3cli.answering.chat_request.parse_chat_request`), queued for the :class:`~m3cli.server.worker.ModelWorker`,
and awaited while watching the client: one that disconnects, or a request that outlives the timeout, has its
work dropped. The answer's row (:func:`m3cli.answering.chat_response.ask_row`, the ``m3 batch`` row) becomes
the ``chat.completion`` or the stream of chunks.
"""

# no "from __future__ import annotations": FastAPI reads the routes' annotations (Request) at definition

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from m3cli.answering.chat_request import ChatAsk, MediaAccess, RequestError, parse_chat_request
from m3cli.answering.chat_response import (
    answer_chunks,
    ask_row,
    completion_body,
    failure_error,
    failure_status,
    new_id,
    now,
    role_chunk,
)
from m3cli.answering.core import Ask, Result
from m3cli.backends.base import Backend
from m3cli.server.settings import ServerSettings
from m3cli.server.worker import Job, ModelWorker

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting request checks that its client is still there


@dataclass
class ServerState:
    """What the routes share: the settings, the worker and the model's description."""

    settings: ServerSettings
    worker: ModelWorker
    backend: Backend
    name: str                                   # the model name responses carry
    names: frozenset[str]                       # the names a request's "model" may take
    access: MediaAccess = field(default_factory=MediaAccess)
    created: int = field(default_factory=now)
    on_ready: Callable[[], None] | None = None  # called once the server accepts requests


def model_card(state: ServerState) -> dict[str, Any]:
    """The one model of ``/v1/models``, with what a client needs to know of its budgets as ``m3``."""
    d = state.settings.defaults
    backend = state.backend
    policy = d.policy
    default = {"tokens": policy.tokens, "auto_scale": policy.auto_scale, "threshold": policy.threshold,
               "measure": policy.measure, "ladder": list(policy.ladder) if policy.ladder else None,
               "on_miss": policy.on_miss, "flags": policy.flags(), "max_visual_tokens": d.max_visual_tokens,
               "max_new_tokens": d.max_new_tokens}
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "m3cli",
            "m3": {"model": backend.model_id, "backend": backend.name, "grid_side": backend.grid_side,
                   "scales": list(backend.scales), "default": default}}


def create_app(state: ServerState):
    """The FastAPI application serving ``state``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from m3cli import __version__
    from m3cli.server import errors

    @asynccontextmanager
    async def lifespan(app):
        if state.on_ready is not None:
            state.on_ready()
        yield

    app = FastAPI(title="m3 serve", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    errors.install(app)
    _handle_gone(app)

    def authorize(request: Request) -> None:
        key = state.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError("missing API key: send the header 'Authorization: Bearer KEY'", 401, None,
                               "missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError("incorrect API key", 401, None, "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.name, "queued": state.worker.queued,
                "in_flight": state.worker.in_flight, "max_queue": state.settings.max_queue}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id not in state.names:
            raise RequestError(f"the model {model_id!r} does not exist here", 404, "model", "model_not_found")
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await _read_body(request, state.settings.max_body_bytes)
        ask: ChatAsk = await run_in_threadpool(
            parse_chat_request, body, state.backend.grid_side, state.settings.defaults, state.access, state.names)
        job = state.worker.submit(Ask(ask.image, ask.question, ask.policy, ask.max_new_tokens, ask.stop))
        ask.image = None  # the worker holds it now; the request keeps only what its row needs
        completion_id, created = new_id(), now()
        if ask.stream:
            return StreamingResponse(_events(state, request, job, ask, completion_id, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await _wait(job, request, state.settings.request_timeout_s)
        finally:
            job.drop()
        row = _row(state, ask, result, completion_id)
        if result.error is not None:
            raise failure_error(row, failure_status(result))
        return JSONResponse(completion_body(row, completion_id, created, state.name))

    return app


def _row(state: ServerState, ask: ChatAsk, result: Result, completion_id: str) -> dict:
    model = state.backend.model_id
    return ask_row(ask, result, completion_id, model, state.backend.name, ask.run_record(model))


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_big = RequestError(f"the body is larger than the limit of {limit} bytes (--max-body-mb)", 413, None,
                           "body_too_large")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError("invalid Content-Length", 400, None, "invalid_request")
        if int(declared) > limit:
            raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _Gone(Exception):
    """The client disconnected while its request waited."""


async def _wait(job: Job, request, timeout_s: float) -> Result:
    """The job's result; its work is dropped when the client disconnects (:class:`_Gone`) or after ``timeout_s``
    (a 504). A model or core failure becomes a 500."""
    future = asyncio.wrap_future(job.future)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_S)
        if done:
            try:
                return future.result()
            except asyncio.CancelledError:
                raise _Gone() from None
            except Exception as exc:  # noqa: BLE001 - the worker's batch failed: this request's 500
                raise RequestError(f"model error: {type(exc).__name__}: {exc}", 500, None, "model_error") from None
        if await request.is_disconnected():
            job.drop()
            raise _Gone()
        if loop.time() > deadline:
            job.drop()
            raise RequestError(f"no answer within {timeout_s:g} s (--request-timeout); the request was dropped",
                               504, None, "timeout")


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _events(state: ServerState, request, job: Job, ask: ChatAsk, completion_id: str,
                  created: int) -> AsyncIterator[str]:
    """The stream: the role chunk at once, then the answer's chunks (or an error event), then ``[DONE]``."""
    try:
        yield _sse(role_chunk(completion_id, created, state.name, ask.include_usage))
        try:
            result = await _wait(job, request, state.settings.request_timeout_s)
        except _Gone:
            return
        except RequestError as exc:
            yield _sse(exc.body())
            yield _sse("[DONE]")
            return
        row = _row(state, ask, result, completion_id)
        if result.error is not None:
            yield _sse(failure_error(row, failure_status(result)).body())
        else:
            for chunk in answer_chunks(row, completion_id, created, state.name, ask.include_usage):
                yield _sse(chunk)
        yield _sse("[DONE]")
    finally:
        job.drop()


def _handle_gone(app) -> None:
    """A non-streaming request whose client left gets no response (there is nobody to read it)."""
    from fastapi.responses import Response

    @app.exception_handler(_Gone)
    async def _gone(request, exc):
        return Response(status_code=499)
