"""``m3 ask --server URL``: one question to a running ``m3 serve``, no model loaded here.

The standard library only (``urllib``): a question costs a process start, two local HTTP calls and no heavy
import. The image is sent as a ``data:`` URL, the budget as the ``m3`` object, so the server answers exactly
what a local ``m3 ask`` with the same flags would. The server's errors come back as the errors local
``m3 ask`` raises, with the same exit codes: a bad image is a :class:`~m3cli.errors.MediaError` (2), a
refused question or a model failure an :class:`~m3cli.errors.ItemError` (1), anything about the call itself
(unreachable server, wrong key, unknown model, bad flag) exit 2.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from m3cli.errors import ItemError, M3Error, MediaError, ModelError, UsageError

SERVER_ENV = "M3_SERVER"
RETRIES_WHEN_BUSY = 3      # a 429 is retried after its Retry-After (at most this many times)
TIMEOUT_S = 600.0

# the keys of Result.to_dict, in its order: a served answer prints as a local one
RESULT_KEYS = ("answer", "confidence", "tokens", "visual_tokens", "crops", "scales_tried", "timings",
               "finish_reason", "prompt_tokens", "completion_tokens")


class ServerError(M3Error):
    """The server cannot be reached or answered something that is not an m3 answer (exit 2)."""


@dataclass
class ServedAnswer:
    """The answer's row (the ``m3`` object), the model's grid side, and the round trip in ms."""

    row: dict[str, Any]
    grid_side: int
    wall_ms: float

    def result_fields(self) -> dict[str, Any]:
        """The fields local ``m3 ask --json`` takes from its ``Result``, in the same order; ``wall_ms`` is the
        round trip as this client saw it."""
        out = {k: self.row.get(k) for k in RESULT_KEYS}
        out["timings"] = {**(out["timings"] or {}), "wall_ms": round(self.wall_ms, 3)}
        return out


def base_url(url: str) -> str:
    """``http://host:port`` from what a user gives (a trailing ``/`` or ``/v1`` dropped; ``http://`` added)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def ask_server(url: str, image: str, question: str, budget: dict[str, Any], max_new_tokens: int,
               model: str | None = None, api_key: str | None = None) -> ServedAnswer:
    """Ask ``question`` about the file ``image`` with ``budget`` (the ``m3`` object; empty: the server's default)."""
    from m3cli.media.files import check_readable_file

    base = base_url(url)
    check_readable_file(image)  # the same one-line MediaError as a local m3 ask, before any call
    try:
        with open(image, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MediaError(f"{image}: cannot read ({exc.strerror or exc})") from None
    start = time.perf_counter()
    card = _call(base, "GET", "/v1/models", None, api_key)["data"][0]
    mime = mimetypes.guess_type(image)[0] or ""
    mime = mime if mime.startswith("image/") else "application/octet-stream"  # the server sniffs the bytes
    content = [{"type": "text", "text": question},
               {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}]
    body: dict[str, Any] = {"model": model or card["id"], "messages": [{"role": "user", "content": content}],
                            "max_completion_tokens": max_new_tokens, "temperature": 0}
    if budget:
        body["m3"] = budget
    reply = _call(base, "POST", "/v1/chat/completions", body, api_key, image=image)
    wall = (time.perf_counter() - start) * 1000
    row = reply.get("m3")
    if not isinstance(row, dict):
        raise ServerError(f"{base} answered without an m3 row: is it an m3 serve server?")
    return ServedAnswer(row, int((card.get("m3") or {}).get("grid_side") or 24), wall)


def request_json(base: str, method: str, path: str, body: dict | None = None, api_key: str | None = None,
                 timeout: float = TIMEOUT_S) -> tuple[int, dict, dict]:
    """One HTTP call to an OpenAI-compatible server: ``(status, JSON body, headers)``; an HTTP error status is
    returned, not raised. Raises :class:`ServerError` when the server cannot be reached or answers no JSON.
    (``m3 bench serve`` drives m3 serve and its peer with it too.)"""
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json(response.read(), base), dict(response.headers)
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            value = json.loads(payload)
        except ValueError:
            value = {}
        return exc.code, value if isinstance(value, dict) else {}, dict(exc.headers)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach the m3 server at {base} ({reason}); start it with m3 serve, or "
                          f"unset ${SERVER_ENV}") from None


def _call(base: str, method: str, path: str, body: dict | None, api_key: str | None, image: str = "") -> dict:
    for attempt in range(RETRIES_WHEN_BUSY + 1):
        status, value, headers = request_json(base, method, path, body, api_key)
        if status == 200:
            return value
        if status == 429 and attempt < RETRIES_WHEN_BUSY:
            time.sleep(min(30.0, float(headers.get("Retry-After") or 1)))
            continue
        raise _error_of(status, value, base, image)
    raise AssertionError("unreachable")


def _json(payload: bytes, base: str) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        raise ServerError(f"{base} answered something that is not JSON: is it an m3 serve server?") from None
    if not isinstance(value, dict):
        raise ServerError(f"{base} answered something that is not an OpenAI response")
    return value


def _error_of(status: int, value: dict, base: str, image: str) -> M3Error:
    """The local error a server's error response stands for (see the module doc)."""
    error = value.get("error")
    if not isinstance(error, dict):
        return ServerError(f"{base} answered HTTP {status} without an OpenAI error body")
    message, code = str(error.get("message") or f"HTTP {status}"), error.get("code")
    if status == 401:
        return ServerError(f"{base}: {message} (set $M3_API_KEY to the server's --api-key)")
    if code == "invalid_image":
        detail = message.removeprefix("the image cannot be used: ")
        return MediaError(detail if detail.startswith(image) else f"{image}: {detail}")
    if code == "model_not_found":
        return ModelError(f"{base}: {message}")
    if code in ("request_refused", "model_error") or status >= 500:
        failed = ItemError(message)
        row = value.get("m3")
        failed.row = row if isinstance(row, dict) else None  # the request's error row (m3 ask --json prints it)
        return failed
    return UsageError(f"{base}: {message}")
