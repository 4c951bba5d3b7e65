"""Result rows: the row schema and the JSONL / CSV / text sinks they are written to."""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import IO, Any, Literal, Protocol, runtime_checkable

from m3cli.errors import one_line
from m3cli.fileio import dumps_row
from m3cli.output.resume import repair_jsonl

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
        row["error"] = one_line(str(row["error"])) or "unknown error"
    return row


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


class JsonlSink(_StreamSink):
    """One compact JSON object per line, UTF-8 kept as is; non-finite floats become null."""

    def write(self, row: dict[str, Any]) -> None:
        # One write call per line, so a kill leaves at most one partial line for read_done_ids to repair.
        self.stream.write(dumps_row(row) + "\n")


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
            return dumps_row(value)
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
        ident = one_line(str(row.get("id")))
        if row.get("error") is not None:
            body = f"ERROR: {one_line(str(row['error']))}"
        else:
            answer = row.get("answer")
            body = "" if answer is None else one_line(str(answer))
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
