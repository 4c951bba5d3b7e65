"""Evaluation data files for ``m3 eval --data``: JSONL or CSV rows of image, question and gold answer.

A source is one file (``.jsonl``/``.ndjson``; ``.csv``, or ``.tsv`` tab-separated), a folder (every such
file under it, recursively, hidden names skipped, in sorted order of their relative paths), or ``-``
(stdin: JSONL if the first non-blank line starts with ``{``, else CSV with a header).

Row fields (CSV: the header names them, case-insensitively; an empty cell is a missing field):

- ``image``: a path, relative to the data file's folder (stdin: to the current folder), or absolute;
- ``question``;
- the gold, one of: ``choices`` + ``answer`` (multiple choice: the answer is a letter ``A``.. or a
  choice's text), ``answers`` (a list of human answers, VQAv2-style; JSONL items may be strings or
  ``{"answer": ...}`` objects), or ``answer`` (one string; a JSONL list here counts as ``answers``).
  When a row has both ``answers`` and ``answer`` (and no choices), ``answers`` is used. In CSV a
  list cell (``answers``, ``choices``) is a JSON list (``["a", "b"]``) or ``|``-separated text;
- optional ``id`` (default: ``<file stem>:<line>``; in a folder ``<relative path without suffix>:<line>``;
  stdin ``stdin:<line>``), ``family`` or ``category`` (``family`` wins).

Ids are made unique in stream order by suffixing ``~2``, ``~3``, ... (as ``m3 batch`` does). Line numbers
are the file's (CSV: the line a record starts on; the header is line 1). A row that cannot be used is a
:class:`BadRow` with a one-line reason, never an exception; only a source that cannot be read at all
(missing, unreadable, a FIFO or device, not JSONL/CSV, a CSV header without ``image``/``question``, a line
longer than the bounded reader's limit) raises ``UsageError``. A folder's FIFOs, devices and broken links
are skipped with a warning. Nothing here decodes images: a row's image is only checked to be a readable
regular file (by its type, before anything opens it).

Two benchmark layouts are read by their own modules (the file is recognised by its content):

- an MMBench / VLMEvalKit TSV (header with ``index``, ``question``, ``A``, ``B``): :mod:`m3cli.eval.mmbench`;
- LLaVA question rows (``question_id`` + ``text``, no ``question``) in JSONL: :mod:`m3cli.eval.llava_files`.

``image_folder`` (``--image-folder``) replaces the data file's folder as the base of relative image paths.

Every row has a content ``key`` besides its id: a hash of what it asks and how it is scored (its image file,
size and modification time, question, gold, choices, family, and an ``id`` the data gives; an MMBench row's
``index``, hint, options and the content of its picture cell; a LLaVA row's ``question_id``), made unique in
stream order like ids. ``--resume`` matches samples by it, so inserted, removed or reordered rows (whose
default ids ``<stem>:<line>`` shift) are evaluated exactly once, and a row whose answer or image changed is
evaluated again.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import IO, Any, Literal, Protocol

from m3cli.errors import UsageError, describe, escape_controls
from m3cli.eval.fields import Bad, GoldKind, image_path, json_type, parse_gold, question_text, scalar_text
from m3cli.eval.scoring import choice_letters
from m3cli.fileio import LineTooLong, content_hash, input_problem, iter_jsonl, iter_lines
from m3cli.media.inputs import unique_ids

log = logging.getLogger(__name__)

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")
CSV_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")


class ImageSource(Protocol):
    """An image that is not a file of its own (an MMBench TSV's base64 cell): its encode-cache key and a
    function giving its encoded bytes as a named stream (decoded by the run's image loader and options)."""

    key: Hashable
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class EvalRow:
    """One question with its gold answer.

    ``gold`` holds the gold values: ``(answer,)`` for "answer", the human answers for "answers", and
    ``(letter,)`` (the resolved option letter) for "choice", whose options are ``choices``; nothing for
    "none" (a row without a gold answer: answered and written, not scored).

    A benchmark layout may fix more: ``prompt`` (the text before the suffix, laid out as the benchmark's own
    script does; None: built from ``question`` and ``choices``), ``metric`` (None: by the gold's form),
    ``image_source`` (the pixels when ``image`` names no file of its own) and ``meta`` (the layout's own
    fields, written with the row's sample: MMBench's index, hint, category levels; LLaVA's question_id).
    """

    id: str
    image: str  # absolute, normalised path
    question: str
    gold_kind: GoldKind
    gold: tuple[str, ...]
    choices: tuple[str, ...] = ()
    family: str | None = None
    source: str = ""  # the data file ("-" for stdin)
    line: int = 0
    key: str = ""  # what the row asks and how it is scored (see the module doc): --resume matches by it
    prompt: str | None = None
    metric: str | None = None
    image_source: ImageSource | None = field(default=None, compare=False)
    meta: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def reference(self) -> str:
        """One human-readable gold: the answer, the most common human answer, or ``"B. text"`` ("" for none)."""
        if self.gold_kind == "none":
            return ""
        if self.gold_kind == "choice":
            letter = self.gold[0]
            return f"{letter}. {self.choices[choice_letters(len(self.choices)).index(letter)]}"
        if self.gold_kind == "answers":
            return max(self.gold, key=self.gold.count)
        return self.gold[0]


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be evaluated; ``reason`` is one line without the location."""

    id: str
    source: str
    line: int
    reason: str
    key: str = ""  # a hash of the row's raw content

    @property
    def message(self) -> str:
        """``<source> line <n>: <reason>``, for error rows and logs."""
        where = "stdin" if self.source == "-" else self.source
        return f"{where} line {self.line}: {self.reason}"


@dataclass(frozen=True)
class _DataFile:
    path: str  # "-" for stdin
    fmt: Literal["jsonl", "csv", "tsv", "mmbench"] | None  # None: sniff (stdin)
    prefix: str  # default-id prefix
    base_dir: str  # relative image paths resolve against this


# --- listing the source ----------------------------------------------------------------------------


def _format_of(path: str) -> Literal["jsonl", "csv", "tsv"] | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in JSONL_SUFFIXES:
        return "jsonl"
    if ext in CSV_SUFFIXES:
        return "tsv" if ext == ".tsv" else "csv"
    return None


def is_data_file(path: str) -> bool:
    """Whether a folder source would read this file (by its suffix): an output there must not look like one."""
    return _format_of(path) is not None


def _list_folder(root: str) -> list[str]:
    found: list[tuple[tuple[str, ...], str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or _format_of(name) is None:
                continue
            path = os.path.join(dirpath, name)
            problem = input_problem(path)
            if problem is not None:  # a FIFO would block the run, a device never end: skipped, and said
                log.warning("skipped %s: %s", escape_controls(path), problem)
                continue
            found.append((tuple(os.path.relpath(path, root).split(os.sep)), path))
    return [path for _, path in sorted(found)]


def _check_readable(path: str) -> None:
    problem = input_problem(path)  # by type first: opening a FIFO blocks
    if problem is not None:
        raise UsageError(f"{path}: {problem}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({describe(exc)})") from None


def _plan(source: str, image_folder: str | None = None) -> list[_DataFile]:
    if image_folder is not None:
        problem = input_problem(image_folder, folder_ok=True)  # by type: a FIFO or device is named for what it is
        if problem is None and not os.path.isdir(image_folder):
            problem = "is a file, not a folder"
        if problem is not None:
            problem = "no such folder" if problem == "file not found" else problem
            raise UsageError(f"--image-folder {image_folder}: {problem}")
    base = os.path.abspath(image_folder) if image_folder is not None else None
    if source == "-":
        return [_DataFile("-", None, "stdin", base or os.getcwd())]
    if not os.path.exists(source):
        problem = input_problem(source)
        raise UsageError(f"{source}: {problem if problem != 'file not found' else 'no such file or folder'}")
    if os.path.isdir(source):
        paths = _list_folder(source)
        if not paths:
            raise UsageError(f"{source}: no {', '.join(JSONL_SUFFIXES + CSV_SUFFIXES)} files in this folder")
        files = []
        for path in paths:
            rel = os.path.relpath(path, source)
            prefix = os.path.splitext(rel)[0].replace(os.sep, "/")
            files.append(_DataFile(path, _format_of(path), prefix, base or os.path.dirname(os.path.abspath(path))))
    else:
        fmt = _format_of(source)
        if fmt is None:
            raise UsageError(f"{source}: not a JSONL or CSV file (expected {', '.join(JSONL_SUFFIXES + CSV_SUFFIXES)})")
        stem = os.path.splitext(os.path.basename(source))[0]
        files = [_DataFile(source, fmt, stem, base or os.path.dirname(os.path.abspath(source)))]
    checked = []
    for f in files:
        _check_readable(f.path)
        if f.fmt in ("csv", "tsv"):
            from m3cli.eval import mmbench

            with open(f.path, "rb") as fh:
                head = _csv_header(_text_lines(_bounded(fh, f.path)), f.path, f.fmt)
            if f.fmt == "tsv" and head is not None and mmbench.is_mmbench_header(head[3]):
                f = _DataFile(f.path, "mmbench", f.prefix, f.base_dir)
        checked.append(f)
    return checked


def _bounded(stream: IO[Any], where: str) -> Iterator[Any]:
    """The lines of a data source through the one bounded reader; a line over its limit is a UsageError
    (the data is read before the model loads, so the run stops before any work)."""
    try:
        yield from iter_lines(stream)
    except LineTooLong as exc:
        raise UsageError(f"{'stdin' if where == '-' else where}: {exc}") from None


# --- rows ------------------------------------------------------------------------------------------


def raw_key(raw: Any) -> str:
    """The content key of a row that cannot be used: a hash of what it holds."""
    return content_hash("bad", raw)


def file_version(path: str) -> tuple[int, int] | None:
    """An image file's size and modification time, for a row's content key (a changed file is another image)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _parse_row(raw: Mapping[str, Any], f: _DataFile, line: int, default_id: str, csv_cell: bool) -> EvalRow | BadRow:
    if not csv_cell and "question" not in raw and "text" in raw and "question_id" in raw:
        from m3cli.eval import llava_files

        return llava_files.parse_question(raw, f.path, line, f.base_dir)
    try:
        given_id = scalar_text(raw.get("id"), "id")
    except Bad as bad:
        return BadRow(default_id, f.path, line, str(bad), raw_key(raw))
    row_id = given_id or default_id
    try:
        question = question_text(raw.get("question"))
        kind, gold, choices = parse_gold(raw, csv_cell)
        family = scalar_text(raw.get("family"), "family") or scalar_text(raw.get("category"), "category")
        image = image_path(raw.get("image"), f.base_dir)
    except Bad as bad:
        return BadRow(row_id, f.path, line, str(bad), raw_key(raw))
    key = content_hash(given_id, image, file_version(image), question, kind, gold, choices, family)
    return EvalRow(row_id, image, question, kind, gold, choices, family, f.path, line, key)


# --- the two formats -------------------------------------------------------------------------------


def _text_lines(lines: Iterable[bytes]) -> Iterator[str]:
    """Decode byte lines as UTF-8 (a BOM on the first line dropped; bad bytes become U+FFFD)."""
    for i, raw in enumerate(lines):
        yield raw.decode("utf-8-sig" if i == 0 else "utf-8", errors="replace")


class _Counted:
    """An iterator of lines that counts how many it has handed out (the csv reader's position)."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines
        self.count = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.count += 1
        return line


def _csv_header(lines: Iterable[str], path: str, fmt: str) -> tuple[list[str], Any, _Counted, list[str]] | None:
    """Read the header of a CSV stream (lower-cased names, the reader, its line count, the names as written);
    None for an empty stream. UsageError when required columns lack."""
    counted = _Counted(iter(lines))
    reader = csv.reader(counted, delimiter="\t" if fmt == "tsv" else ",")
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        header = [c.strip().lower() for c in cells]
        missing = [name for name in ("image", "question") if name not in header]
        if missing:
            where = "stdin" if path == "-" else path
            raise UsageError(
                f"{where}: the CSV header has no {' or '.join(repr(m) for m in missing)} column "
                f"(found: {', '.join(h for h in header if h) or 'nothing'})"
            )
        return header, reader, counted, [c.strip() for c in cells]
    return None


def _iter_csv(lines: Iterable[str], f: _DataFile, fmt: str) -> Iterator[EvalRow | BadRow]:
    head = _csv_header(lines, f.path, fmt)
    if head is None:
        return
    header, reader, counted, _raw = head
    while True:
        start = counted.count + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield BadRow(f"{f.prefix}:{start}", f.path, start, f"not valid CSV ({describe(exc)})",
                         raw_key([f.path, start, describe(exc)]))
            continue
        if not any(c.strip() for c in cells):
            continue
        raw = {name: cell for name, cell in zip(header, cells, strict=False) if name and cell.strip()}
        yield _parse_row(raw, f, start, f"{f.prefix}:{start}", csv_cell=True)


def _iter_jsonl(lines: Iterable[bytes], f: _DataFile) -> Iterator[EvalRow | BadRow]:
    # ``lines`` come from the bounded reader (_bounded): iter_jsonl only checks them
    for line, _end, raw, parsed in iter_jsonl(lines):  # type: ignore[arg-type]
        default_id = f"{f.prefix}:{line}"
        if parsed is None:
            continue
        if isinstance(parsed, Exception):
            reason = f"not valid JSON ({parsed.msg})" if isinstance(parsed, json.JSONDecodeError) else "not UTF-8"
            yield BadRow(default_id, f.path, line, reason, raw_key(raw.strip().decode("utf-8", "replace")))
        elif not isinstance(parsed, dict):
            yield BadRow(default_id, f.path, line, f"expected a JSON object (got {json_type(parsed)})",
                         raw_key(parsed))
        else:
            yield _parse_row(parsed, f, line, default_id, csv_cell=False)


def _byte_lines(stream: IO[Any]) -> Iterator[bytes]:
    """Byte lines of a binary or text stream (tests hand in io.StringIO), through the bounded reader."""
    binary = getattr(stream, "buffer", None)
    if binary is not None:
        yield from _bounded(binary, "-")
        return
    for line in _bounded(stream, "-"):
        yield line if isinstance(line, bytes) else line.encode("utf-8")


def _iter_stdin(stream: IO[Any], f: _DataFile) -> Iterator[EvalRow | BadRow]:
    lines = _byte_lines(stream)
    head: list[bytes] = []
    for raw in lines:
        head.append(raw)
        if raw.strip():
            break
    if not head or not head[-1].strip():
        return
    all_lines = itertools.chain(head, lines)
    if head[-1].lstrip().lstrip(b"\xef\xbb\xbf").startswith(b"{"):
        yield from _iter_jsonl(all_lines, f)
    else:
        yield from _iter_csv(_text_lines(all_lines), f, "csv")


def _iter_file(f: _DataFile) -> Iterator[EvalRow | BadRow]:
    try:
        fh = open(f.path, "rb")  # closed by the ``with`` below, once the rows are read
    except OSError as exc:
        raise UsageError(f"{f.path}: cannot read ({describe(exc)})") from None
    with fh:
        if f.fmt == "jsonl":
            yield from _iter_jsonl(_bounded(fh, f.path), f)
        elif f.fmt == "mmbench":
            from m3cli.eval import mmbench

            yield from mmbench.iter_rows(fh, f.path)
        else:
            yield from _iter_csv(_text_lines(_bounded(fh, f.path)), f, f.fmt or "csv")


def read_eval_data(source: str | os.PathLike[str], stdin: IO[Any] | None = None,
                   image_folder: str | os.PathLike[str] | None = None) -> Iterator[EvalRow | BadRow]:
    """The rows of an eval data source (file, folder or ``-``), in order, ids unique.

    The source is checked now (UsageError if it cannot be read, is not JSONL/CSV, or a CSV header lacks
    ``image``/``question``); rows are parsed lazily. ``stdin`` replaces ``sys.stdin`` for ``-``; relative
    image paths resolve against ``image_folder`` when given.
    """
    files = _plan(os.fspath(source), os.fspath(image_folder) if image_folder is not None else None)

    def rows() -> Iterator[EvalRow | BadRow]:
        for f in files:
            if f.path == "-":
                yield from _iter_stdin(stdin if stdin is not None else sys.stdin, f)
            else:
                yield from _iter_file(f)

    return unique_keys(unique_ids(rows()))


def unique_keys(rows: Iterable[EvalRow | BadRow]) -> Iterator[EvalRow | BadRow]:
    """Rows whose content keys repeat (the same question about the same image, scored the same) get
    ``~2``, ``~3``, ... in stream order, so each is evaluated once."""
    counts: dict[str, int] = {}
    for row in rows:
        n = counts.get(row.key, 0) + 1
        counts[row.key] = n
        yield row if n == 1 else replace(row, key=f"{row.key}~{n}")


# --- many questions per image ----------------------------------------------------------------------


def image_key(path: str | os.PathLike[str]) -> str:
    """The identity of an image file: its resolved path (symlinks and ``..`` followed)."""
    return os.path.realpath(os.fspath(path))


def group_by_image(rows: Iterable[EvalRow]) -> list[tuple[str, list[EvalRow]]]:
    """``[(image_key, rows about that image)]`` in first-seen order, rows in their own order: each
    image can be decoded and encoded once for all its questions. BadRows, if any, are skipped."""
    groups: dict[str, list[EvalRow]] = {}
    for row in rows:
        if isinstance(row, EvalRow):
            groups.setdefault(image_key(row.image), []).append(row)
    return list(groups.items())


def split_rows(rows: Iterable[EvalRow | BadRow]) -> tuple[list[EvalRow], list[BadRow]]:
    """Separate good rows from bad ones, each list in stream order."""
    good: list[EvalRow] = []
    bad: list[BadRow] = []
    for row in rows:
        (good if isinstance(row, EvalRow) else bad).append(row)  # type: ignore[arg-type]
    return good, bad


__all__ = [
    "BadRow",
    "EvalRow",
    "GoldKind",
    "ImageSource",
    "data_files",
    "group_by_image",
    "image_key",
    "is_data_file",
    "read_eval_data",
    "split_rows",
]


def data_files(source: str | os.PathLike[str]) -> list[str]:
    """The files a data source reads (none for stdin): what an output of the same run must not be."""
    return [f.path for f in _plan(os.fspath(source)) if f.path != "-"]
