"""Result rows: schema, in-order writing, JSONL/CSV/text sinks, resume from a JSONL output, run summary.

Rows come back from workers out of order; :class:`OrderedWriter` puts them back in input order and writes
and flushes each one as soon as every row before it is done, so a killed run loses at most the rows still
buffered, and :func:`read_done_ids` can resume it from the JSONL file it left behind.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

ROW_KEYS: tuple[str, ...] = (
    "id",
    "source",
    "frame",
    "time_s",
    "question",
    "answer",
    "confidence",
    "tokens",
    "scales_tried",
    "model",
    "backend",
    "timings",
    "error",
)

_NESTED_KEYS = frozenset({"scales_tried", "timings"})

Format = Literal["jsonl", "csv", "text"]


def _one_line(text: str) -> str:
    """Collapse every whitespace run (newlines and tabs included) to one space."""
    return " ".join(text.split())


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every key of ``ROW_KEYS`` in order, missing ones None; unknown keys raise ValueError.

    ``error`` is made one line (tracebacks and multi-line messages would break the text format and
    line-oriented tools); an empty error message still marks the row as failed.
    """
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row field(s): {', '.join(sorted(unknown))}")
    row = {key: fields.get(key) for key in ROW_KEYS}
    if row["error"] is not None:
        row["error"] = _one_line(str(row["error"])) or "unknown error"
    return row


# ---------------------------------------------------------------------------------------------- sinks


@runtime_checkable
class RowSink(Protocol):
    """Where rows go. ``write`` may buffer; ``flush`` makes written rows visible; ``close`` flushes."""

    def write(self, row: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _StreamSink:
    """Shared stream handling: closes the stream only if it owns it (never stdout)."""

    def __init__(self, stream: IO[str], owns: bool = False) -> None:
        self.stream = stream
        self.owns = owns
        self.closed = False

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.flush()
        if self.owns:
            self.stream.close()


def _json_default(value: Any) -> Any:
    """Encode the odd non-JSON value instead of killing a long run: numpy scalars via .item(), else str()."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """Replace NaN/inf (which json.dumps would emit as invalid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"), default=_json_default)


class JsonlSink(_StreamSink):
    """One compact JSON object per line, UTF-8 kept as is; non-finite floats become null."""

    def write(self, row: dict[str, Any]) -> None:
        # One write call per line, so a kill leaves at most one partial line for read_done_ids to repair.
        self.stream.write(_dumps(row) + "\n")


class CsvSink(_StreamSink):
    """CSV with a ``ROW_KEYS`` header (once), nested fields JSON-encoded in their cell, None as empty.

    The header is written with the first row, or at close if there were none (so an empty run still yields
    a valid CSV); pass ``header=False`` when appending to a file that already has one.
    """

    def __init__(self, stream: IO[str], owns: bool = False, header: bool = True) -> None:
        super().__init__(stream, owns)
        # "\n" rather than csv's default "\r\n": matches the other formats and stdout.
        self._writer = csv.writer(stream, lineterminator="\n")
        self._header_pending = header

    def _write_header(self) -> None:
        if self._header_pending:
            self._header_pending = False
            self._writer.writerow(ROW_KEYS)

    @staticmethod
    def _cell(key: str, value: Any) -> Any:
        if value is None:
            return ""
        if key in _NESTED_KEYS or isinstance(value, (dict, list, tuple)):
            return _dumps(value)
        if isinstance(value, float) and not math.isfinite(value):
            return ""
        return value

    def write(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(ROW_KEYS)
        if unknown:
            raise ValueError(f"unknown row field(s): {', '.join(sorted(unknown))}")
        self._write_header()
        self._writer.writerow([self._cell(key, row.get(key)) for key in ROW_KEYS])

    def close(self) -> None:
        if not self.closed:
            self._write_header()
        super().close()


class TextSink(_StreamSink):
    """Human format, one line per row: ``{id}<TAB>{answer}<TAB>[{tokens} tok, conf {confidence:.2f}]``.

    Error rows read ``{id}<TAB>ERROR: {error}``. Whitespace runs in answers are collapsed so each row stays
    one line; bracket parts whose value is None are left out (the whole bracket if both are).
    """

    def write(self, row: dict[str, Any]) -> None:
        ident = _one_line(str(row.get("id")))
        if row.get("error") is not None:
            body = f"ERROR: {_one_line(str(row['error']))}"
        else:
            answer = row.get("answer")
            body = "" if answer is None else _one_line(str(answer))
        parts = []
        if row.get("tokens") is not None:
            parts.append(f"{row['tokens']} tok")
        confidence = row.get("confidence")
        if isinstance(confidence, (int, float)) and math.isfinite(confidence):
            parts.append(f"conf {confidence:.2f}")
        line = f"{ident}\t{body}"
        if parts:
            line += f"\t[{', '.join(parts)}]"
        self.stream.write(line + "\n")


def repair_jsonl(path: str | os.PathLike[str]) -> int:
    """Truncate a JSONL file to the end of its last complete, valid line; returns bytes removed.

    See :func:`read_done_ids` for what counts as complete. A missing file removes nothing.
    """
    _, removed = _scan_jsonl(path, repair=True)
    return removed


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def open_sink(fmt: Format, path: str | os.PathLike[str] | None, append: bool = False) -> RowSink:
    """A sink for ``fmt`` writing to ``path`` (None or "-": stdout, which is never closed).

    With ``append`` an existing file is extended: a JSONL file is first repaired (a half-written last line
    would otherwise glue onto the next row), a CSV file that already has content gets no second header, and
    a CSV/text file not ending in a newline gets one so new rows start on their own line.
    """
    if fmt not in ("jsonl", "csv", "text"):
        raise ValueError(f"unknown output format {fmt!r} (expected jsonl, csv or text)")
    if path is None or str(path) == "-":
        stream: IO[str] = sys.stdout
        owns = False
        has_content = False
    else:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        has_content = append and os.path.exists(path) and os.path.getsize(path) > 0
        if has_content and fmt == "jsonl":
            repair_jsonl(path)
            has_content = os.path.getsize(path) > 0
        needs_newline = has_content and fmt != "jsonl" and not _ends_with_newline(path)
        # newline="": we write "\n" ourselves and csv needs untranslated line ends.
        stream = open(path, "a" if append else "w", encoding="utf-8", newline="")
        owns = True
        if needs_newline:
            stream.write("\n")
    if fmt == "jsonl":
        return JsonlSink(stream, owns=owns)
    if fmt == "csv":
        return CsvSink(stream, owns=owns, header=not has_content)
    return TextSink(stream, owns=owns)


# ----------------------------------------------------------------------------------------- ordering


class OrderedWriter:
    """Writes rows tagged with sequence numbers 0, 1, 2, ... in sequence order, whatever order they arrive in.

    Each row is written and flushed as soon as it and every row before it are done; only rows that arrived
    ahead of a missing one are buffered, so memory is bounded by the out-of-order window. ``max_pending``
    turns that window into a hard limit (OverflowError beyond it), a guard against a producer that
    never fills a gap. Thread-safe: workers may call ``put``/``skip`` directly.
    """

    def __init__(self, sink: RowSink, max_pending: int | None = None) -> None:
        self.sink = sink
        self.max_pending = max_pending
        self._next = 0
        # seq -> row, or None for a skipped seq that arrived ahead of the next one.
        self._buffer: dict[int, dict[str, Any] | None] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.written = 0

    @property
    def next_seq(self) -> int:
        """The lowest sequence number not yet written or skipped."""
        return self._next

    @property
    def pending(self) -> int:
        """Sequence numbers received (rows or skips) but held back behind a missing earlier one."""
        return len(self._buffer)

    def put(self, seq: int, row: dict[str, Any]) -> None:
        """Hand over the row for ``seq``; writes it and any rows it was blocking."""
        self._accept(seq, row)

    def skip(self, seq: int) -> None:
        """Mark ``seq`` as producing no row (e.g. already done in a resumed run), letting later rows flow."""
        self._accept(seq, None)

    def _accept(self, seq: int, row: dict[str, Any] | None) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("OrderedWriter is closed")
            if seq < 0:
                raise ValueError(f"sequence numbers start at 0, got {seq}")
            if seq < self._next or seq in self._buffer:
                raise ValueError(f"sequence number {seq} given twice")
            if seq != self._next and self.max_pending is not None and len(self._buffer) >= self.max_pending:
                raise OverflowError(
                    f"{len(self._buffer)} rows waiting on sequence number {self._next} (max_pending={self.max_pending})"
                )
            self._buffer[seq] = row
            while self._next in self._buffer:
                ready = self._buffer.pop(self._next)
                self._next += 1
                if ready is not None:
                    self._emit(ready)

    def _emit(self, row: dict[str, Any]) -> None:
        self.sink.write(row)
        # Per-row flush: a crash or kill must not lose rows already reported as written.
        self.sink.flush()
        self.written += 1

    def close(self) -> list[int]:
        """Write what is still buffered (in order, past any gaps), close the sink, return the missing seqs.

        An empty list means every sequence number up to the highest seen was put or skipped. Rows behind a
        gap are still written rather than dropped, so a resumed run need not redo them; a non-empty result
        is a caller bug or an aborted run. Only gaps below the highest seen seq are known here: compare
        ``next_seq`` with the input count to catch trailing ones. Closing twice returns ``[]``.
        """
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            missing: list[int] = []
            if self._buffer:
                top = max(self._buffer)
                missing = [s for s in range(self._next, top) if s not in self._buffer]
                for seq in sorted(self._buffer):
                    ready = self._buffer.pop(seq)
                    if ready is not None:
                        self._emit(ready)
                self._next = top + 1
            self.sink.close()
            return missing


# -------------------------------------------------------------------------------------------- resume


def _scan_jsonl(path: str | os.PathLike[str], repair: bool) -> tuple[dict[str, bool], int]:
    """Map id -> "last row for it is an error", and truncate trailing incomplete/invalid lines if asked."""
    try:
        f = open(path, "rb")  # closed by the with below
    except FileNotFoundError:
        return {}, 0
    last_error: dict[str, bool] = {}
    good_end = 0  # byte offset just past the last complete, valid row line
    offset = 0
    with f:
        for lineno, raw in enumerate(f, start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # unterminated last line: the writer may have died before the newline
            if not raw.strip():
                continue  # blank line: harmless, but not worth keeping at the very end
            try:
                row = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError (line cut inside a UTF-8 sequence)
                log.warning("%s:%d: not valid JSON, ignored", os.fspath(path), lineno)
                continue
            if not isinstance(row, dict) or row.get("id") is None:
                log.warning("%s:%d: not a result row, ignored", os.fspath(path), lineno)
                continue
            last_error[str(row["id"])] = row.get("error") is not None
            good_end = offset
        size = f.seek(0, os.SEEK_END)
    removed = size - good_end
    if repair and removed:
        with open(path, "r+b") as w:
            w.truncate(good_end)
            w.flush()
            os.fsync(w.fileno())
        log.warning("%s: removed %d trailing byte(s) of incomplete output", os.fspath(path), removed)
    return last_error, removed if repair else 0


def read_done_ids(path: str | os.PathLike[str], retry_errors: bool = False) -> set[str]:
    """Ids already done in a JSONL output, after repairing the file so it can be appended to.

    Repair: the file is truncated to the end of its last complete, valid row line. A final line without a
    trailing newline is incomplete even if it parses (a killed writer may have stopped right before the
    newline), and trailing lines that are not valid JSON rows go too. Invalid lines followed by valid ones
    are left in place and skipped. A missing or empty file gives an empty set.

    Error rows count as done unless ``retry_errors``; then ids whose LAST row is an error are not returned,
    but their lines stay, so after the retry the file holds both rows for an id. Readers (``m3 merge``
    included) keep the last row per id.
    """
    last_error, _ = _scan_jsonl(path, repair=True)
    return {ident for ident, failed in last_error.items() if not (retry_errors and failed)}


def read_error_ids(path: str | os.PathLike[str]) -> set[str]:
    """Ids whose last row in a JSONL output is an error (no repair; read after ``read_done_ids``)."""
    last_error, _ = _scan_jsonl(path, repair=False)
    return {ident for ident, failed in last_error.items() if failed}


# ------------------------------------------------------------------------------------------- summary


@dataclass
class Summary:
    """Counts for a run and its one-line report; rates are over items actually processed (done + failed)."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_failed: int = 0  # skipped items whose earlier row is an error (they still count for the exit code)
    tokens: int = 0  # summed over successful rows that report tokens
    token_rows: int = 0
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float | None = None  # fixed by stop(); live otherwise

    def add(self, row: dict[str, Any]) -> None:
        """Count one written row: failed if it has an error, else done (and its tokens)."""
        if row.get("error") is not None:
            self.failed += 1
            return
        self.done += 1
        if row.get("tokens") is not None:
            self.tokens += int(row["tokens"])
            self.token_rows += 1

    def skip(self, n: int = 1, failed: bool = False) -> None:
        """Count items not run (e.g. already done when resuming); ``failed`` if their earlier row is an error."""
        self.skipped += n
        if failed:
            self.skipped_failed += n

    def stop(self) -> None:
        """Freeze the elapsed time."""
        self.elapsed_s = time.monotonic() - self.started

    @property
    def elapsed(self) -> float:
        return self.elapsed_s if self.elapsed_s is not None else time.monotonic() - self.started

    @property
    def mean_tokens(self) -> float | None:
        return self.tokens / self.token_rows if self.token_rows else None

    @property
    def items_per_s(self) -> float | None:
        elapsed = self.elapsed
        return (self.done + self.failed) / elapsed if elapsed > 0 else None

    def line(self) -> str:
        """E.g. ``done 195, failed 3, skipped 2 · mean tokens 9.0 · 41.3 items/s``."""
        mean = self.mean_tokens
        rate = self.items_per_s
        counts = f"done {self.done}, failed {self.failed}, skipped {self.skipped}"
        if self.skipped_failed:
            counts += f" ({self.skipped_failed} with an earlier error row)"
        return (
            f"{counts}"
            f" · mean tokens {'n/a' if mean is None else f'{mean:.1f}'}"
            f" · {'n/a' if rate is None else f'{rate:.1f}'} items/s"
        )

    def __str__(self) -> str:
        return self.line()
