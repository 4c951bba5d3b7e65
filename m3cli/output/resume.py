"""Resuming from a JSONL results file: which inputs are done, and repairing a file a killed run left half-written.

:func:`prepare_resume` is what ``--resume`` runs before any work (``m3 batch -o``, ``m3 eval --samples``): it
refuses, leaving the file byte-for-byte untouched, a file that is not the command's JSONL (a
:class:`RowSchema` says what its lines hold) or whose rows were made with another question, model or budget,
and only then cuts a half-written last line. Every line is read through the one bounded reader
(:func:`m3cli.fileio.iter_jsonl`). The lenient readers below (:func:`read_done_ids`, :func:`read_error_ids`)
skip what they do not understand.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from m3cli.errors import OutputError, describe
from m3cli.fileio import LineTooLong, escape_surrogates, iter_jsonl

log = logging.getLogger(__name__)


RowId = Callable[[dict[str, Any]], Any]


def _top_id(row: dict[str, Any]) -> Any:
    return row.get("id")


def repair_jsonl(path: str | os.PathLike[str], row_id: RowId = _top_id) -> int:
    """Truncate a JSONL file to the end of its last complete, valid line; returns bytes removed.

    See :func:`read_done_ids` for what counts as complete; ``row_id`` finds a row's id (default: its ``id``
    field; a layout that keeps it elsewhere says where). A missing file removes nothing.
    """
    _, removed = _scan_jsonl(path, repair=True, row_id=row_id)
    return removed


def _scan_jsonl(path: str | os.PathLike[str], repair: bool,
                row_id: RowId = _top_id) -> tuple[dict[str, bool], int]:
    """Map id -> "last row for it is an error", and truncate trailing incomplete/invalid lines if asked."""
    try:
        f = open(path, "rb")  # closed by the with below
    except FileNotFoundError:
        return {}, 0
    last_error: dict[str, bool] = {}
    good_end = 0  # byte offset just past the last complete, valid row line
    with f:
        try:
            for lineno, end, raw, row in iter_jsonl(f):
                if not raw.endswith(b"\n"):
                    break  # unterminated last line: the writer may have died before the newline
                if not raw.strip():
                    continue  # blank line: harmless, but not worth keeping at the very end
                if isinstance(row, ValueError):  # not JSON, or a line cut inside a UTF-8 sequence
                    log.warning("%s:%d: not valid JSON, ignored", os.fspath(path), lineno)
                    continue
                if not isinstance(row, dict) or row_id(row) is None:
                    log.warning("%s:%d: not a result row, ignored", os.fspath(path), lineno)
                    continue
                last_error[str(row_id(row))] = row.get("error") is not None
                good_end = end
        except LineTooLong as exc:
            raise OutputError(f"{escape_surrogates(os.fspath(path))}: {exc}") from None
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


# What every m3 batch row has (older versions included) and how its line starts: make_row puts "id" first.
ROW_REQUIRED_KEYS = frozenset({"id", "source", "question", "answer", "error"})
_ROW_START = b'{"id"'
_PEEK = 4096
RUN_KEY = "run"


@dataclass(frozen=True)
class RowSchema:
    """What the lines of one command's incremental results file hold, for the checks of ``--resume`` and of
    the output guard: ``required`` keys of every line, how a line starts, the field naming the input a
    line answers (``ident``; a line without it is kept but matches no input), and the field holding the run
    record (None: none)."""

    name: str  # e.g. "m3 batch JSONL output"
    command: str  # who writes it, e.g. "m3 batch"
    required: frozenset[str]
    ident: str = "id"
    start: bytes = _ROW_START
    run_key: str | None = RUN_KEY
    # a layout whose lines wrap the row (an OpenAI Batch output line carries it as "m3"): the row of a line
    unwrap: Callable[[Any], Any] | None = None

    def row_id(self, line: dict[str, Any]) -> Any:
        """The id of the row a line holds (None: the line holds none), for :func:`repair_jsonl`."""
        row = self.unwrap(line) if self.unwrap is not None else line
        return row.get("id") if isinstance(row, dict) else None


BATCH_ROWS = RowSchema("m3 batch JSONL output", "m3 batch", ROW_REQUIRED_KEYS)

_RUN_LABELS = {
    "model": "model",
    "question": "question",
    "tokens": "--tokens",
    "auto_scale": "--auto-scale",
    "threshold": "--threshold",
    "ladder": "--ladder",
    "measure": "--measure",
    "on_miss": "--on-miss",
    "max_new_tokens": "--max-new-tokens",
    "max_visual_tokens": "--max-visual-tokens",
    "upright": "--upright",
    "alpha_background": "--alpha-background",
    "fast_decode": "--fast-decode",
}


@dataclass
class ResumeState:
    """What a resumed output already holds."""

    done_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)  # done ids whose last row is an error
    rows: int = 0
    repaired_bytes: int = 0


def _not_ours(path: str, lineno: int, why: str, schema: RowSchema = BATCH_ROWS) -> OutputError:
    return OutputError(
        f"{escape_surrogates(path)}:{lineno}: {why}, so this is not {schema.name}; --resume only appends "
        f"to a file {schema.command} wrote (the file was left untouched)"
    )


def _check_row_line(path: str, lineno: int, row: Any, schema: RowSchema = BATCH_ROWS) -> str | None:
    """The input a complete line answers (its ``schema.ident``; None when it names none); OutputError when the
    line is not one of the schema's rows."""
    if isinstance(row, Exception):
        raise _not_ours(path, lineno, "line is not JSON", schema)
    if not isinstance(row, dict):
        raise _not_ours(path, lineno, "line is not a JSON object", schema)
    missing = sorted(schema.required - set(row))
    if missing:
        raise _not_ours(path, lineno, f"row lacks {', '.join(repr(k) for k in missing)}", schema)
    if not isinstance(row["id"], str):
        raise _not_ours(path, lineno, "row id is not a string", schema)
    ident = row.get(schema.ident)
    return ident if isinstance(ident, str) else None


def looks_like(path: str | os.PathLike[str], schema: RowSchema = BATCH_ROWS) -> bool:
    """Whether the file at ``path`` starts like ``schema``'s output (its first line one of its rows): how the
    output guard tells a results file of ours from someone else's file."""
    try:
        with open(path, "rb") as f:
            for _lineno, _end, raw, row in iter_jsonl(f, limit=1 << 20):
                if row is None:
                    continue
                if schema.unwrap is not None:
                    row = schema.unwrap(row)
                return raw.lstrip().startswith(schema.start) and isinstance(row, dict) \
                    and schema.required <= set(row)
    except (OSError, ValueError):
        return False
    return False


def run_differences(old: dict[str, Any], new: dict[str, Any], other: str = "this run") -> str:
    """How two run records differ, for a one-line message: ``question "a" (this run: "b"), --tokens 9 (...)``."""
    order = list(_RUN_LABELS)
    diffs = []
    for key in sorted(set(old) | set(new), key=lambda k: (order.index(k) if k in order else len(order), k)):
        if old.get(key) != new.get(key):
            label = _RUN_LABELS.get(key, key)
            diffs.append(f"{label} {_shown(old.get(key))} ({other}: {_shown(new.get(key))})")
    return ", ".join(diffs)


def _run_difference(path: str, old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return (f"{escape_surrogates(path)}: its rows carry no run record (written by an older m3), so their "
                "question, model and budget cannot be checked; --force resumes anyway")
    return (f"{escape_surrogates(path)}: its rows were made with {run_differences(old, new)}; resuming would mix "
            "two runs in one file (--force resumes anyway)")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return json.dumps(escape_surrogates(text), ensure_ascii=False)
    return json.dumps(value)


def prepare_resume(
    path: str | os.PathLike[str],
    run: dict[str, Any] | None = None,
    force: bool = False,
    retry_errors: bool = False,
    schema: RowSchema = BATCH_ROWS,
) -> ResumeState:
    """Check that ``path`` can be resumed, cut a half-written last line, and return what it holds.

    Our JSONL: every complete line is blank or a JSON object with the keys of a row (``schema.required``);
    an unterminated last line is a row cut by a kill when it starts like one (``{"id"``), and is then
    removed. A missing or empty file is fine. With ``run`` (the record of this run), every row must carry
    the same record unless ``force``. Anything else (a line over the reader's limit too) raises
    :class:`OutputError` (one line) and leaves the file exactly as it was. ``done_ids`` are the rows'
    ``schema.ident`` values; with ``retry_errors`` those whose last row is an error are not done. A schema
    whose lines wrap the row (an OpenAI Batch output line) reads it out with ``schema.unwrap`` before the checks.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")  # closed by the with below
    except FileNotFoundError:
        return ResumeState()
    except OSError as exc:
        raise OutputError(f"{escape_surrogates(path)}: cannot read ({describe(exc)})") from None
    state = ResumeState()
    last_error: dict[str, bool] = {}
    good_end = 0
    mismatch: str | None = None
    with f:
        if not os.path.isfile(path):
            raise OutputError(f"{escape_surrogates(path)}: --resume needs a regular file")
        head = f.read(_PEEK)
        text = head.lstrip()
        start = schema.start
        if text and not (start.startswith(text) or text.startswith(start)):
            # refused before reading on: a binary file or one huge line would cost memory for nothing
            raise _not_ours(path, head[: len(head) - len(text)].count(b"\n") + 1, "line does not start like a row",
                            schema)
        f.seek(0)
        try:
            for lineno, end, raw, row in iter_jsonl(f):
                if not raw.endswith(b"\n"):
                    if not raw.lstrip().startswith(start):
                        raise _not_ours(path, lineno, "last line is not a row", schema)
                    break  # a row cut by a kill: removed below
                if row is None:  # blank line
                    continue
                if schema.unwrap is not None:
                    row = schema.unwrap(row)
                ident = _check_row_line(path, lineno, row, schema)
                if run is not None and schema.run_key and not force and mismatch is None \
                        and row.get(schema.run_key) != run:
                    mismatch = _run_difference(path, row.get(schema.run_key), run)
                if ident is not None:
                    last_error[ident] = row.get("error") is not None
                state.rows += 1
                good_end = end
        except LineTooLong as exc:
            raise _not_ours(path, exc.lineno, f"line is longer than {exc.shown}", schema) from None
        size = f.seek(0, os.SEEK_END)
    if mismatch is not None:
        raise OutputError(mismatch)
    if size > good_end:
        _truncate(path, good_end, size - good_end)
        state.repaired_bytes = size - good_end
    state.done_ids = {i for i, failed in last_error.items() if not (retry_errors and failed)}
    state.failed_ids = {i for i, failed in last_error.items() if failed} & state.done_ids
    return state


def _truncate(path: str, size: int, removed: int) -> None:
    try:
        with open(path, "r+b") as w:
            w.truncate(size)
            w.flush()
            os.fsync(w.fileno())
    except OSError as exc:
        raise OutputError(f"{escape_surrogates(path)}: cannot cut its half-written last line ({describe(exc)})") \
            from None
    log.warning("%s: removed %d trailing byte(s) of incomplete output", escape_surrogates(path), removed)
