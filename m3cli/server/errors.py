"""Every failure as an OpenAI error body: ``{"error": {"message", "type", "param", "code"}}`` with its status.

A request m3 refuses is a :class:`~m3cli.answering.chat_request.RequestError` (4xx); an unknown path or
method, a full queue, a timeout and anything unexpected get the same shape, so a client never sees HTML or a
traceback, and one bad request never stops the server.
"""

from __future__ import annotations

import logging

from m3cli.answering.chat_request import RequestError

log = logging.getLogger(__name__)


def json_error(error: RequestError, headers: dict[str, str] | None = None):
    """The JSON response of ``error``."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def install(app) -> None:
    """Route every exception the app can meet to an OpenAI error body."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from m3cli.server.worker import QueueFull

    @app.exception_handler(RequestError)
    async def _refused(request, exc: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return json_error(exc, headers)

    @app.exception_handler(QueueFull)
    async def _busy(request, exc: QueueFull):
        error = RequestError(f"the server is busy: every queue place is taken; retry after {exc.retry_after} s",
                             429, None, "queue_full")
        return json_error(error, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return json_error(RequestError(message, exc.status_code, None, None), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return json_error(RequestError(f"invalid request: {exc.errors()[0].get('msg', 'bad value')}", 400))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        return json_error(RequestError(f"internal error: {type(exc).__name__}", 500, None, "internal_error"))
