"""Result rows: the row schema and the JSONL / CSV / text sinks they are written to.

Every row is made by :func:`make_row`, the one place that makes it writable and reproducible: its text is
valid Unicode (a file name that is not valid UTF-8 is written with ``\\xNN`` escapes, and ``source_b64``
holds the exact bytes of ``source``), and its confidences are rounded to ``CONFIDENCE_DIGITS`` significant
digits, so the digits do not depend on which items shared a batch (straight, resumed and sharded runs write
the same rows). A sink that cannot write raises :class:`OutputWriteError` (one line, exit code 1).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from typing import IO, Any, Literal, Protocol, runtime_checkable

from m3cli.errors import OutputError, describe, one_line
from m3cli.fileio import dumps_row, escape_surrogates, has_surrogates, path_bytes_b64, text_safe
from m3cli.output.resume import RowId, repair_jsonl

ROW_KEYS: tuple[str, ...] = (
    "id",
    "source",
    "frame",
    "time_s",
    "question",
    "answer",
    "confidence",
    "tokens",  # the per-crop scale of the final rung (the paper's --tokens)
    "visual_tokens",  # what the LM received at it (LLaVA-NeXT: every crop pooled, newlines included)
    "crops",  # crops the vision tower encoded (1 for LLaVA-1.5; tiles + base for LLaVA-NeXT)
    "scales_tried",
    "model",
    "backend",
    "timings",
    "finish_reason",  # the final answer's: "stop" (end of sequence or a stop sequence) or "length" (cut short)
    "prompt_tokens",  # positions the LM prefilled (text + visual), summed over every rung tried
    "completion_tokens",  # tokens the LM generated, summed over every rung tried
    "error",
    "note",  # a remark on an answer that looks like none (an empty generation), else None
    "run",  # what the row was made with (model, run question, budget): --resume checks it
    "source_b64",  # the exact bytes of a source that is not valid UTF-8 (base64), else None
    "frames",  # a video collage's frame indices (m3 batch --video-mode collage), else None
    # what was done to an image file's pixels (m3cli.media.Picture.fields; None for video frames and errors):
    "upright",  # True: turned by its EXIF orientation (--upright); False: it has one, fed as stored; else None
    "alpha",  # "dropped" (as the recipe does) or the "#rrggbb" transparency was composited onto; None: opaque
    "decode_scale",  # --fast-decode: the JPEG's reduced decode scale (0.5, 0.25, 0.125), else None
    "threshold_met",  # --auto-scale: whether the answer's rung reached the threshold; None for a fixed scale
)

_NESTED_KEYS = frozenset({"scales_tried", "timings", "run"})

# Batched float32 kernels differ in the last bits with the batch's composition (about 1e-7 here); four
# significant digits hide that in all but the rarest rows while keeping more precision than any threshold needs.
CONFIDENCE_DIGITS = 4


class OutputWriteError(OutputError):
    """The output stopped accepting rows part-way (disk full, a closed pipe): rows written so far are kept."""

    exit_code = 1


def round_confidence(value: Any) -> Any:
    """A confidence rounded to ``CONFIDENCE_DIGITS`` significant digits (non-numbers returned as they are)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return value
    return float(f"{value:.{CONFIDENCE_DIGITS}g}")


def round_confidences(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``confidence`` and each ``scales_tried`` rung's confidence rounded (a new dict)."""
    out = dict(fields)
    if "confidence" in out:
        out["confidence"] = round_confidence(out["confidence"])
    rungs = out.get("scales_tried")
    if isinstance(rungs, (list, tuple)):
        out["scales_tried"] = [
            {**r, "confidence": round_confidence(r.get("confidence"))} if isinstance(r, dict) and "confidence" in r
            else r
            for r in rungs
        ]
    return out

Format = Literal["jsonl", "csv", "text"]


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every key of ``ROW_KEYS`` in order, missing ones None; unknown keys raise ValueError.

    ``error`` is made one line (tracebacks and multi-line messages would break the text format and
    line-oriented tools); an empty error message still marks the row as failed. Strings are made valid
    Unicode (see the module doc; ``source_b64`` is filled in when ``source`` needed escaping) and
    confidences rounded.
    """
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row field(s): {', '.join(sorted(unknown))}")
    source = fields.get("source")
    if fields.get("source_b64") is None and isinstance(source, str) and has_surrogates(source):
        fields = {**fields, "source_b64": path_bytes_b64(source)}
    fields = text_safe(round_confidences(fields))
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
    """Shared stream handling: closes the stream only if it owns it (never stdout).

    An ``OSError`` from the stream (disk full, permissions, a closed pipe) becomes :class:`OutputWriteError`
    naming the output; the sink is then broken: later writes raise the same error and ``close`` only
    releases the stream, so what was written before stays as it is.
    """

    def __init__(self, stream: IO[str], owns: bool = False) -> None:
        self.stream = stream
        self.owns = owns
        self.closed = False
        self.failed: OutputWriteError | None = None

    @property
    def name(self) -> str:
        name = getattr(self.stream, "name", None)
        return "stdout" if not isinstance(name, str) or name.startswith("<") else escape_surrogates(name)

    def _put(self, text: str) -> None:
        """Write ``text`` (one call per row, so a kill leaves at most one partial line)."""
        if self.failed is not None:
            raise self.failed
        try:
            self.stream.write(text)
        except OSError as exc:
            raise self._fail(exc) from None

    def _fail(self, exc: OSError) -> OutputWriteError:
        self.failed = OutputWriteError(f"{self.name}: cannot write ({describe(exc)})")
        _quiet_broken_stdout(self.stream)
        return self.failed

    def flush(self) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            self.stream.flush()
        except OSError as exc:
            raise self._fail(exc) from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.failed is None:
                self.flush()
        finally:
            if self.owns:
                try:
                    self.stream.close()
                except OSError:  # the buffered tail of a failed write: already reported
                    pass


def _quiet_broken_stdout(stream: IO[str]) -> None:
    """After stdout failed (full disk, closed pipe), point fd 1 at /dev/null so the interpreter's own
    flush at exit does not add an "Exception ignored" report to the one line already given."""
    if stream is not sys.stdout and stream is not sys.__stdout__:
        return
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # not a real fd (a test runner's buffer)
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


class JsonlSink(_StreamSink):
    """One compact JSON object per line, UTF-8 kept as is; non-finite floats become null."""

    def write(self, row: dict[str, Any]) -> None:
        # One write call per line, so a kill leaves at most one partial line for read_done_ids to repair.
        self._put(dumps_row(row) + "\n")


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...), +cmd|...); OWASP's
# "CSV injection" advice: prefix such a cell with an apostrophe, which spreadsheets show as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    """A CSV cell that a spreadsheet shows as text: ``'`` prepended when ``value`` starts like a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value


class CsvSink(_StreamSink):
    """CSV with a ``ROW_KEYS`` header (once), nested fields JSON-encoded in their cell, None as empty.

    The header is written with the first row, or at close if there were none (so an empty run still yields
    a valid CSV); pass ``header=False`` when appending to a file that already has one. A text cell that
    starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading apostrophe
    (:func:`csv_safe`), so opening the file in a spreadsheet never runs a formula from a file name or answer.
    """

    def __init__(self, stream: IO[str], owns: bool = False, header: bool = True) -> None:
        super().__init__(stream, owns)
        # Each record is formatted here, then written with one call (errors are the sink's to report).
        self._buffer = io.StringIO()
        # "\n" rather than csv's default "\r\n": matches the other formats and stdout.
        self._writer = csv.writer(self._buffer, lineterminator="\n")
        self._header_pending = header

    def _record(self, cells) -> None:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(cells)
        self._put(self._buffer.getvalue())

    def _write_header(self) -> None:
        if self._header_pending:
            self._header_pending = False
            self._record(ROW_KEYS)

    @staticmethod
    def _cell(key: str, value: Any) -> Any:
        if value is None:
            return ""
        if key in _NESTED_KEYS or isinstance(value, (dict, list, tuple)):
            return dumps_row(value)
        if isinstance(value, float) and not math.isfinite(value):
            return ""
        if isinstance(value, str):
            return csv_safe(value)
        return value

    def write(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(ROW_KEYS)
        if unknown:
            raise ValueError(f"unknown row field(s): {', '.join(sorted(unknown))}")
        self._write_header()
        self._record([self._cell(key, row.get(key)) for key in ROW_KEYS])

    def close(self) -> None:
        if not self.closed and self.failed is None:
            try:
                self._write_header()
            except OutputWriteError:
                super().close()
                raise
        super().close()


class TextSink(_StreamSink):
    """Human format, one line per row: ``{id}<TAB>{answer}<TAB>[{tokens} tok, conf {confidence:.2f}]``.

    Error rows read ``{id}<TAB>ERROR: {error}``. Whitespace runs in answers are collapsed so each row stays
    one line, and control characters (a file name's escape sequences) are written as escapes (``\\x1b``), so
    printing rows never drives the terminal; bracket parts whose value is None are left out (the whole
    bracket if both are).
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
        self._put(line + "\n")


def escape_path(path: str) -> str:
    """A path as it may appear in a one-line message (undecodable bytes escaped)."""
    return escape_surrogates(os.fspath(path))


def make_parent(path: str) -> None:
    """Create the folder ``path`` goes in; :class:`OutputError` (one line) when that is impossible."""
    parent = os.path.dirname(path)
    if not parent or os.path.isdir(parent):
        return
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else describe(exc)
        raise OutputError(f"{escape_path(path)}: cannot create its folder {escape_path(parent)} ({why})") from None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def open_sink(fmt: Format, path: str | os.PathLike[str] | None, append: bool = False,
              row_id: RowId | None = None) -> RowSink:
    """A sink for ``fmt`` writing to ``path`` (None or "-": stdout, which is never closed).

    With ``append`` an existing file is extended: a JSONL file is first repaired (a half-written last line
    would otherwise glue onto the next row), a CSV file that already has content gets no second header, and
    a CSV/text file not ending in a newline gets one so new rows start on their own line. ``row_id`` finds the
    id of a JSONL line's row for that repair (default: its ``id`` field; see :meth:`RowSchema.row_id`).
    """
    if fmt not in ("jsonl", "csv", "text"):
        raise ValueError(f"unknown output format {fmt!r} (expected jsonl, csv or text)")
    if path is None or str(path) == "-":
        stream: IO[str] = sys.stdout
        owns = False
        has_content = False
    else:
        path = os.fspath(path)
        make_parent(path)
        try:
            has_content = append and os.path.exists(path) and os.path.getsize(path) > 0
            if has_content and fmt == "jsonl":
                repair_jsonl(path, *(() if row_id is None else (row_id,)))
                has_content = os.path.getsize(path) > 0
            needs_newline = has_content and fmt != "jsonl" and not _ends_with_newline(path)
            # newline="": we write "\n" ourselves and csv needs untranslated line ends.
            stream = open(path, "a" if append else "w", encoding="utf-8", newline="")
            if needs_newline:
                stream.write("\n")
        except OSError as exc:
            raise OutputError(f"{escape_path(path)}: cannot write ({describe(exc)})") from None
        owns = True
    if fmt == "jsonl":
        return JsonlSink(stream, owns=owns)
    if fmt == "csv":
        return CsvSink(stream, owns=owns, header=not has_content)
    return TextSink(stream, owns=owns)
