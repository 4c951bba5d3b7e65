"""OpenAI response bodies built from an answer's row: ``chat.completion``, stream chunks, Batch output lines.

The row is the one ``m3 batch`` writes (:func:`m3cli.output.make_row`, fed by ``Result.to_dict``): the body's
``choices``/``usage`` are read from it and the row itself travels as the ``m3`` extension, so a served
answer, a Batch output line and a batch row share one schema.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from m3cli.answering.chat_request import ChatAsk, RequestError
from m3cli.answering.core import Result
from m3cli.output import make_row


def new_id(prefix: str = "chatcmpl") -> str:
    """A fresh response id, ``chatcmpl-<32 hex>`` (``batch_req-...`` for Batch lines)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """``created``: whole seconds since the epoch."""
    return int(time.time())


def ask_row(ask: ChatAsk, result: Result, row_id: str, model: str, backend: str, run: dict | None = None) -> dict:
    """The row of one answered (or failed) request, as ``m3 batch`` makes rows."""
    return make_row(id=row_id, source=ask.source, question=ask.question, model=model, backend=backend, run=run,
                    **result.to_dict(), note=result.note, **ask.pixels)


def usage(row: dict) -> dict[str, int]:
    """``usage`` from a row: every rung's prompt and completion tokens (0 where the backend did not say)."""
    prompt = int(row.get("prompt_tokens") or 0)
    completion = int(row.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(row: dict, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """A ``chat.completion`` for an answered row, the row as ``m3``."""
    from m3cli.answering.chat_shapes import ChatCompletion

    body = ChatCompletion(
        id=completion_id, created=created, model=model,
        choices=[{"index": 0, "message": {"role": "assistant", "content": row.get("answer") or ""},
                  "finish_reason": row.get("finish_reason") or "stop"}],
        usage=usage(row), m3=row,
    )
    return body.model_dump()


def _chunk(completion_id: str, created: int, model: str, delta: dict, finish: str | None = None,
           include_usage: bool = False, **extra: Any) -> dict[str, Any]:
    from m3cli.answering.chat_shapes import ChatCompletionChunk

    chunk = ChatCompletionChunk(id=completion_id, created=created, model=model,
                                choices=[{"index": 0, "delta": delta, "finish_reason": finish}], **extra)
    out = chunk.model_dump(exclude_none=True)
    for choice in out["choices"]:
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
    if include_usage:
        out["usage"] = None  # as the API: every chunk before the usage chunk says it has none
    return out


def role_chunk(completion_id: str, created: int, model: str, include_usage: bool = False) -> dict[str, Any]:
    """The first stream chunk: the assistant's role, no content yet."""
    return _chunk(completion_id, created, model, {"role": "assistant", "content": ""}, include_usage=include_usage)


def answer_chunks(row: dict, completion_id: str, created: int, model: str,
                  include_usage: bool = False) -> list[dict[str, Any]]:
    """The stream chunks after the role: the answer in word pieces, the final chunk (``finish_reason`` and the
    row as ``m3``), and with ``include_usage`` a usage chunk with no choices."""
    text = row.get("answer") or ""
    pieces = re.findall(r"\s*\S+", text) or ([text] if text else [])
    chunks = [_chunk(completion_id, created, model, {"content": p}, include_usage=include_usage) for p in pieces]
    chunks.append(_chunk(completion_id, created, model, {}, row.get("finish_reason") or "stop",
                         include_usage=include_usage, m3=row))
    if include_usage:
        from m3cli.answering.chat_shapes import ChatCompletionChunk

        last = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage(row))
        chunks.append(last.model_dump(exclude_none=True) | {"choices": []})
    return chunks


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {...}}`` for a status, as :class:`RequestError` makes it."""
    return RequestError(message, status, param, code).body()


def failure_status(result: Result) -> int:
    """The HTTP status of a failed answer: 400 when the request asked what cannot be answered (its question, its
    budget for this image), 500 when the model failed on it."""
    from m3cli.answering.core import REFUSED

    return 400 if result.failure == REFUSED else 500


def failure_error(row: dict, status: int) -> RequestError:
    """The :class:`RequestError` of a failed row (``status`` from :func:`failure_status`)."""
    code = "request_refused" if status < 500 else "model_error"
    return RequestError(str(row.get("error") or "unknown error"), status, None, code, row=row)


# -- OpenAI Batch output lines -------------------------------------------------------------------

def batch_line(row: dict, custom_id: str | None, model: str, status: int | None = None,
               error: RequestError | None = None, created: int | None = None) -> dict[str, Any]:
    """One OpenAI Batch output line for a row: ``{"id", "custom_id", "response": {"status_code", "request_id",
    "body"}, "error"}``. An answered row gets a 200 and its ``chat.completion``; a refused or failed request its
    status and error body (the row as ``m3`` beside it); a line that is no request at all (``status`` None)
    ``response: null`` and ``error: {"code", "message"}``, the row as a top-level ``m3``."""
    line_id = new_id("batch_req")
    created = now() if created is None else created
    if status is None:
        err = error or RequestError(str(row.get("error") or "invalid request line"))
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": err.code or "invalid_request", "message": str(err)}, "m3": row}
    request_id = new_id("req")
    if status == 200:
        body = completion_body(row, new_id(), created, model)
    else:
        err = error or RequestError(str(row.get("error") or "unknown error"), status)
        body = err.body() | {"m3": row}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def row_of_batch_line(line: Any) -> Any:
    """The row a Batch output line carries (``m3`` in its body, or beside a null response); anything that is not
    such a line is returned as it is, for the resume checks to refuse."""
    if not isinstance(line, dict) or "custom_id" not in line:
        return line
    if isinstance(line.get("m3"), dict):
        return line["m3"]
    response = line.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    row = body.get("m3") if isinstance(body, dict) else None
    return row if isinstance(row, dict) else line
