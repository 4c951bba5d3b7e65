"""Resuming from a JSONL output: which ids are done, and repairing a file a killed run left half-written."""

from __future__ import annotations

import logging
import os

from m3cli.fileio import iter_jsonl

log = logging.getLogger(__name__)


def repair_jsonl(path: str | os.PathLike[str]) -> int:
    """Truncate a JSONL file to the end of its last complete, valid line; returns bytes removed.

    See :func:`read_done_ids` for what counts as complete. A missing file removes nothing.
    """
    _, removed = _scan_jsonl(path, repair=True)
    return removed


def _scan_jsonl(path: str | os.PathLike[str], repair: bool) -> tuple[dict[str, bool], int]:
    """Map id -> "last row for it is an error", and truncate trailing incomplete/invalid lines if asked."""
    try:
        f = open(path, "rb")  # closed by the with below
    except FileNotFoundError:
        return {}, 0
    last_error: dict[str, bool] = {}
    good_end = 0  # byte offset just past the last complete, valid row line
    with f:
        for lineno, end, raw, row in iter_jsonl(f):
            if not raw.endswith(b"\n"):
                break  # unterminated last line: the writer may have died before the newline
            if not raw.strip():
                continue  # blank line: harmless, but not worth keeping at the very end
            if isinstance(row, ValueError):  # not JSON, or a line cut inside a UTF-8 sequence
                log.warning("%s:%d: not valid JSON, ignored", os.fspath(path), lineno)
                continue
            if not isinstance(row, dict) or row.get("id") is None:
                log.warning("%s:%d: not a result row, ignored", os.fspath(path), lineno)
                continue
            last_error[str(row["id"])] = row.get("error") is not None
            good_end = end
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
