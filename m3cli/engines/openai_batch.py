"""OpenAI Batch API files in ``m3 batch``: ``--input-format openai`` reads them, ``--format openai`` writes them.

Input, one request per line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
(as ``vllm run-batch`` takes). Each body goes through :func:`m3cli.answering.chat_request.parse_chat_request`,
the parser ``m3 serve`` uses, into one :class:`~m3cli.engines.units.Unit` with the request's own policy, answer
length and stop sequences; the engine then answers them as any other batch (shared encodes, mixed budgets,
rows in input order, resumable). A line that is no request, or a request m3 refuses, is that line's error
row, never a stop.

Row ids are the ``custom_id`` (the request's own id; a repeat gets ``~2``, ``~3``); a line without one is an
error row named by its content, ``FILE:HASH`` (``stdin:HASH``), never by its number, so ``--resume`` skips the
requests already answered whatever lines were inserted or removed. Lines go through the one bounded reader
(:func:`m3cli.fileio.iter_lines`), each at most :data:`~m3cli.answering.chat_request.MAX_REQUEST_BYTES` (the
server's largest request).

With ``--format openai`` each row is written as an OpenAI Batch output line
(:func:`m3cli.answering.chat_response.batch_line`): ``response.status_code`` 200 and the ``chat.completion``, or
the status and error body of a refused (4xx) or failed (500) request; ``response: null`` and ``error`` for a
line that is no request. The row travels in it as ``m3``, which ``--resume`` reads back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from m3cli.answering.chat_request import (
    MAX_REQUEST_BYTES,
    ChatDefaults,
    MediaAccess,
    RequestError,
    model_names,
    parse_chat_request,
)
from m3cli.answering.chat_response import batch_line, failure_error, row_of_batch_line
from m3cli.answering.core import REFUSED
from m3cli.engines.units import BatchOptions, Unit
from m3cli.errors import UsageError, describe
from m3cli.fileio import LineTooLong, content_hash, escape_surrogates, iter_lines
from m3cli.media import BadInput, Item
from m3cli.output import BATCH_ROWS, RowSchema, RowSink

__all__ = ["OPENAI_BATCH_ROWS", "OpenAIBatchInput", "OpenAIBatchSink", "count_requests", "row_of_batch_line"]

ENDPOINT = "/v1/chat/completions"
# What an ``m3 batch --format openai`` output file holds, for the output guard and --resume: Batch output lines,
# each wrapping the row of ``m3 batch`` (read out by row_of_batch_line before the checks).
OPENAI_BATCH_ROWS = RowSchema("m3 batch OpenAI Batch output", "m3 batch", BATCH_ROWS.required,
                              unwrap=row_of_batch_line)
# m3 batch answers the user's own files: any local path, but no server-side fetching
BATCH_ACCESS = MediaAccess(local_dirs=None, fetch=None,
                           remote_hint="m3 batch reads data: URLs and local files; download the images first")


@dataclass
class _Line:
    """What a row's output line needs beyond the row: the request's ``custom_id`` and why it failed, if it did."""

    custom_id: str | None
    unit: Unit
    error: RequestError | None = None   # refused before answering
    request: bool = True                # False: the line is no request at all (response: null)


class OpenAIBatchInput:
    """The requests of OpenAI Batch files as numbered units; ``lines`` is what :class:`OpenAIBatchSink` reads."""

    def __init__(self, paths: Sequence[str], grid_side: int, defaults: ChatDefaults, model_id: str,
                 given: str | None = None) -> None:
        self.paths = list(paths)
        self.grid_side = grid_side
        self.defaults = defaults
        self.model_name, names = model_names(model_id)
        self.names = names | {given} if given else names  # the --model value names it too (a registry name)
        self.lines: dict[str, _Line] = {}

    def units(self, opts: BatchOptions) -> Iterator[Unit]:
        """One unit per non-blank line, in order; those whose id ``opts.done_ids`` holds are skipped undecoded."""
        for seq, (row_id, where, request, custom_id, problem) in enumerate(_requests(self.paths)):
            if row_id in opts.done_ids:
                yield Unit(seq, Item(row_id, where, "image"), skip=True, id=row_id)
                continue
            yield self._unit(seq, row_id, custom_id, where, request, problem)

    def _unit(self, seq: int, row_id: str, custom_id: str | None, where: str, request: Any,
              problem: RequestError | None) -> Unit:
        if problem is None:
            try:
                ask = parse_chat_request(request, self.grid_side, self.defaults, BATCH_ACCESS, self.names,
                                         streaming=False)
            except RequestError as exc:
                unit = Unit(seq, BadInput(row_id, where, str(exc)), error=str(exc), id=row_id)
                self.lines[row_id] = _Line(custom_id, unit, exc)
                return unit
            unit = Unit(seq, Item(row_id, ask.source, "image", question=ask.question), image=ask.image, id=row_id,
                        question=ask.question, policy=ask.policy, max_new_tokens=ask.max_new_tokens, stop=ask.stop,
                        pixels=ask.pixels)
            self.lines[row_id] = _Line(custom_id, unit)
            return unit
        unit = Unit(seq, BadInput(row_id, where, str(problem)), error=str(problem), id=row_id)
        self.lines[row_id] = _Line(custom_id, unit, problem, request=False)
        return unit


def count_requests(paths: Sequence[str], done_ids: Container[str] = ()) -> int:
    """The rows a run over the Batch files ``paths`` (not stdin) will answer: one per non-blank line whose id
    ``done_ids`` does not hold (``--resume``), as :meth:`OpenAIBatchInput.units` names them; for a progress
    total."""
    return sum(row_id not in done_ids for row_id, *_ in _requests(paths))


def _requests(paths: Sequence[str]) -> Iterator[tuple[str, str, Any, str | None, RequestError | None]]:
    """``(row id, FILE:LINE, body, custom_id, why it is no request)`` of every non-blank line, in order. A line
    over the reader's limit is one last error row of its file, which is not read further."""
    used: dict[str, int] = {}
    for path in paths:
        name = "stdin" if path == "-" else escape_surrogates(path)
        for lineno, raw in _lines(path):
            where = f"{name}:{lineno}"
            if isinstance(raw, LineTooLong):  # no newline in sight: one error row, the file not read further
                problem = _line_error(f"{where}: longer than {raw.shown} (no newline: not an OpenAI Batch file); "
                                      "it was not read further")
                yield _unique(f"{name}:line-{lineno}", used), where, None, None, problem
                break
            if not raw.strip():
                continue
            request, custom_id, problem = _request_of(raw, where)
            # custom_id is the request's own id; a line without one is named by its content, never by its
            # number, so lines inserted above it do not change it
            base = custom_id if custom_id is not None else \
                f"{name}:{content_hash(raw.strip().decode('utf-8', 'surrogateescape'), length=8)}"
            yield _unique(base, used), where, request, custom_id, problem


def _lines(path: str) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """``(lineno, raw line)`` of an OpenAI Batch file or stdin through the one bounded line reader (a line may
    hold images as data: URLs, so the limit is the server's largest request); a line over it comes as the
    :class:`LineTooLong` and ends the reading."""
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream (tests)
            yield from _bounded(line.encode("utf-8", "surrogateescape") for line in sys.stdin)
            return
        yield from _bounded(stream)
        return
    try:
        f = open(path, "rb")  # closed by the with below; checked by type before (job.check: input_problem)
    except OSError as exc:
        raise UsageError(f"{escape_surrogates(path)}: cannot read ({describe(exc)})") from None
    with f:
        yield from _bounded(f)


def _bounded(stream: Any) -> Iterator[tuple[int, bytes | LineTooLong]]:
    try:
        yield from enumerate(iter_lines(stream, MAX_REQUEST_BYTES), start=1)
    except LineTooLong as exc:
        yield exc.lineno, exc


def _request_of(raw: bytes, where: str) -> tuple[Any, str | None, RequestError | None]:
    """``(body, custom_id, None)`` of a Batch request line, or ``(None, custom_id or None, why it is none)``."""
    text = raw.strip()
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    try:
        line = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, None, _line_error(f"{where}: not JSON ({describe(exc)})")
    if not isinstance(line, dict):
        return None, None, _line_error(f"{where}: not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, None, _line_error(f"{where}: no custom_id (a non-empty string)")
    if line.get("method", "POST") != "POST":
        return None, custom_id, _line_error(f"{where}: method must be POST")
    if line.get("url") != ENDPOINT:
        return None, custom_id, _line_error(f"{where}: url must be {ENDPOINT} (got {line.get('url')!r})")
    if not isinstance(line.get("body"), dict):
        return None, custom_id, _line_error(f"{where}: body must be a JSON object (the chat-completions request)")
    return line["body"], custom_id, None


def _line_error(message: str) -> RequestError:
    return RequestError(message, 400, None, "invalid_request_line")


def _unique(row_id: str, used: dict[str, int]) -> str:
    """``row_id``, or ``row_id~2``, ``~3``, ... for its repeats (as ``m3 batch`` makes input ids unique)."""
    row_id = escape_surrogates(row_id)
    n = used.get(row_id, 0) + 1
    used[row_id] = n
    return row_id if n == 1 else f"{row_id}~{n}"


class OpenAIBatchSink:
    """A sink that writes each row as an OpenAI Batch output line into ``inner`` (a JSONL sink)."""

    def __init__(self, inner: RowSink, source: OpenAIBatchInput) -> None:
        self.inner = inner
        self.source = source

    def write(self, row: dict[str, Any]) -> None:
        entry = self.source.lines.pop(str(row.get("id")), None)
        custom_id = entry.custom_id if entry is not None else row.get("id")
        if row.get("error") is None:
            line = batch_line(row, custom_id, self.source.model_name, 200)
        elif entry is not None and entry.error is not None:
            status = entry.error.status if entry.request else None
            line = batch_line(row, custom_id, self.source.model_name, status, entry.error)
        else:  # answered with an error: the request's problem (400) or the model's (500)
            status = 400 if entry is not None and entry.unit.failure == REFUSED else 500
            line = batch_line(row, custom_id, self.source.model_name, status, failure_error(row, status))
        self.inner.write(line)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
