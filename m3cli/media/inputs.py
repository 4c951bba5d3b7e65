"""Input listing: named files, folders (walked recursively, sorted) and ``-`` (stdin paths or JSONL rows).

Enumeration is cheap (nothing is decoded) and never stops early: an input that cannot become an
:class:`Item` is a :class:`BadInput` row. Every row gets a stable, unique id (see docs/architecture.md).

File names are carried as Python does for the OS: a byte that is not valid UTF-8 is a lone surrogate
(``surrogateescape``), so ``source`` opens the very file whatever its name. Ids are what rows show and
``--resume`` / ``--shard`` match, so they are valid Unicode: such bytes are written ``\\xNN``
(:func:`m3cli.fileio.escape_surrogates`). Stdin is read as bytes for the same reason.

A run that asks several questions (``m3 batch -q A -q B``) writes one row per (item, question): the row of
question ``k`` (1-based, in the order given) has the id ``<item id>#q<k>`` (:func:`question_ids`); a video
frame's is ``<video id>#<frame>#q<k>``. An item that brings its own question (a stdin JSONL row) is asked
only that one and keeps its id, as does every item of a run with a single question.

Ids name an input by what it is, never by where it stands, so ``--resume`` after rows were inserted,
removed or reordered answers each input exactly once: a path's id is the path; a stdin JSONL row without
``id`` that sets its own ``question`` or ``tokens`` gets ``<path>~<hash>`` (8 hex digits of its question and
budget), and a line that is not a usable row ``stdin:<hash>`` (of the line). Only inputs that are the same in
every respect share a base id; their repeats get ``~2``, ``~3`` in stream order.

Stdin is read through the one bounded line reader (:func:`m3cli.fileio.iter_lines`): a line over its limit
(input without newlines, ``< /dev/zero``) is one error row and ends the reading of stdin.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Literal, TypeVar

from m3cli.errors import describe, escape_controls
from m3cli.fileio import LineTooLong, content_hash, escape_surrogates, input_problem, iter_lines, special_kind
from m3cli.media.files import media_kind, note_skipped

log = logging.getLogger(__name__)

R = TypeVar("R")  # a frozen dataclass with an ``id: str`` field


@dataclass(frozen=True)
class Item:
    """A cheap descriptor of one unit of work; pixels are loaded later by the caller."""

    id: str
    source: str
    kind: Literal["image", "video", "frame"]
    frame: int | None = None
    time_s: float | None = None
    question: str | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class BadInput:
    """An input that could not become an Item; the caller writes it as an error row (one, labelled with
    ``question`` when the input brought a question of its own, as its answer would have been; else one per
    question of the run)."""

    id: str
    source: str
    error: str
    question: str | None = None


QUESTION_MARK = "#q"  # between an item's id and its question number in a several-question run


def question_ids(item_id: str, n: int) -> list[str]:
    """The row ids of an item asked ``n`` questions: ``[item_id]`` for one, ``item_id#q1 .. #qn`` for more."""
    if n <= 1:
        return [item_id]
    return [f"{item_id}{QUESTION_MARK}{k}" for k in range(1, n + 1)]


def split_question_id(row_id: str) -> tuple[str, int | None]:
    """``("a.png", 2)`` for ``"a.png#q2"``; ``(row_id, None)`` for an id without a question number."""
    head, sep, tail = row_id.rpartition(QUESTION_MARK)
    if sep and head and tail.isdigit() and not tail.startswith("0"):
        return head, int(tail)
    return row_id, None


def _walk(root: str, visited: set[tuple[int, int]], skipped: set[str]) -> Iterator[tuple[str, str] | BadInput]:
    """Yield (path, kind) for media under ``root`` depth-first with names sorted at every level.

    Sorting siblings by name in a depth-first walk orders files by their path components.
    """
    try:
        st = os.stat(root)
        key = (st.st_dev, st.st_ino)
        if key in visited:
            log.debug("skipped directory already visited (symlink loop?): %s", root)
            return
        visited.add(key)
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        error = f"{root}: cannot read directory ({describe(e)})"
        yield BadInput(id=os.path.normpath(root), source=root, error=error)
        return
    for entry in entries:
        if entry.name.startswith("."):
            log.debug("skipped hidden path: %s", entry.path)
            continue
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError:
            is_dir = is_file = False
        if is_dir:
            yield from _walk(entry.path, visited, skipped)
        elif is_file:
            kind = media_kind(entry.name)
            if kind is None:
                note_skipped(entry.path, skipped)  # a WARNING once per unknown extension
                continue
            yield entry.path, kind
        else:
            _note_unreadable(entry.path)


def _note_unreadable(path: str) -> None:
    """A walk met a broken link, a FIFO, a device or a socket: skipped (opening a FIFO would block), and said."""
    name = escape_controls(escape_surrogates(path))
    try:
        kind = special_kind(os.stat(path).st_mode) or "not a regular file"
    except OSError:
        kind = "a broken symbolic link" if os.path.islink(path) else "unreadable"
    log.warning("skipped %s: %s (name it explicitly to get an error row for it)", name, kind)


def _expand_path(
    path: str, *, item_id: str | None = None, question: str | None = None, tokens: int | None = None,
    suffix: str = "",
) -> Iterator[Item | BadInput]:
    """Items for one explicitly named path (file, video or directory); ``suffix`` ends every default id."""
    norm = os.path.normpath(path)
    if not os.path.exists(path):
        problem = input_problem(path)
        why = problem if problem and problem != "file not found" else "no such file or directory"
        yield BadInput(id=item_id or norm + suffix, source=path, error=f"{path}: {why}", question=question)
        return
    if os.path.isdir(path):
        root_id = item_id if item_id is not None else norm
        for found in _walk(path, set(), set()):
            if isinstance(found, BadInput):
                yield found
                continue
            fpath, kind = found
            rel = os.path.relpath(fpath, path)
            yield Item(
                id=os.path.normpath(os.path.join(root_id, rel)) + ("" if item_id is not None else suffix),
                source=fpath,
                kind=kind,  # type: ignore[arg-type]
                question=question,
                tokens=tokens,
            )
        return
    # An explicitly named file with an unknown extension is still tried as an image: the user asked for
    # it, and load_image gives a precise error if it is not one.
    kind = media_kind(path) or "image"
    yield Item(id=item_id or norm + suffix, source=path, kind=kind, question=question, tokens=tokens)


def line_id(line: str) -> str:
    """The id of a stdin line that is not a usable row: ``stdin:`` and a hash of the line (not its number, which
    changes when lines are inserted above it)."""
    return f"stdin:{content_hash(line.strip(), length=8)}"


def _own_label(value: object) -> str | None:
    """How a row's own ``question`` field labels its error row (None: the row sets none)."""
    if value is None:
        return None
    return value if isinstance(value, str) and value.strip() else json.dumps(value, ensure_ascii=False)


def _jsonl_row(line: str, lineno: int) -> Iterator[Item | BadInput]:
    where = f"stdin line {lineno}"
    bad_id = line_id(line)
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        yield BadInput(id=bad_id, source="-", error=f"{where}: invalid JSON ({e.msg} at column {e.colno})")
        return
    if not isinstance(row, dict):
        yield BadInput(id=bad_id, source="-", error=f"{where}: expected a JSON object")
        return
    raw_id = row.get("id")
    item_id = str(raw_id) if raw_id is not None and not isinstance(raw_id, (dict, list)) else None
    image = row.get("image")
    question = row.get("question")
    tokens = row.get("tokens")
    # a row that sets its own question or budget is another input than the bare image: its id says which
    suffix = "" if item_id is not None or (question is None and tokens is None) else \
        "~" + content_hash(question, tokens, length=8)
    if not isinstance(image, str) or not image:
        yield BadInput(id=item_id or bad_id, source="-", error=f"{where}: missing or non-string 'image'",
                       question=_own_label(question))
        return
    problem = None
    if question is not None and not isinstance(question, str):
        problem = "'question' must be a string"
    elif question is not None and not question.strip():
        problem = "'question' is empty (leave it out to ask the run's question)"
    elif tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        problem = "'tokens' must be a positive integer"
    if problem:
        yield BadInput(id=item_id or os.path.normpath(image) + suffix, source=image, error=f"{where}: {problem}",
                       question=_own_label(question))
        return
    yield from _expand_path(image, item_id=item_id, question=question, tokens=tokens, suffix=suffix)


def _stdin_lines(stdin: IO) -> Iterator[str]:
    """Lines of stdin as text, through the bounded reader; read as bytes where possible, so a path that is not
    valid UTF-8 keeps its bytes (``surrogateescape``, as the OS hands names to Python) whatever the stream's
    encoding or error mode."""
    binary = getattr(stdin, "buffer", None)
    if binary is None:  # already text (a StringIO in tests and library use)
        yield from iter_lines(stdin)
        return
    for raw in iter_lines(binary):
        yield raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw


def _read_stdin(stdin: IO) -> Iterator[Item | BadInput]:
    lines = _stdin_lines(stdin)
    lineno = 0
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except LineTooLong as exc:  # no newline in sight: one error row, and stdin is not read further
            yield BadInput(id=f"stdin:line-{exc.lineno}", source="-",
                           error=f"stdin line {exc.lineno}: longer than {exc.shown} (no newline: not a list of "
                                 "paths or JSONL rows); stdin was not read further")
            return
        lineno += 1
        line = raw.strip()
        if lineno == 1:
            line = line.lstrip("\ufeff")  # tolerate a UTF-8 BOM from Windows tools
        if not line:
            continue
        if line.startswith("{"):
            yield from _jsonl_row(line, lineno)
        else:
            yield from _expand_path(line)


def unique_ids(rows: Iterable[R]) -> Iterator[R]:
    """Make ids valid Unicode (undecodable bytes escaped) and unique: repeats get ~2, ~3, ... in stream order.

    ``rows`` are frozen dataclasses with an ``id`` field (Item, BadInput, or any other input row).
    """
    used: set[str] = set()
    counts: dict[str, int] = {}
    for row in rows:
        safe = escape_surrogates(row.id)
        if safe != row.id:
            row = replace(row, id=safe)
        new_id = row.id
        if new_id in used:
            n = counts.get(row.id, 1)
            while True:
                n += 1
                new_id = f"{row.id}~{n}"
                if new_id not in used:
                    break
            counts[row.id] = n
            row = replace(row, id=new_id)
        used.add(new_id)
        yield row


def iter_inputs(paths: Sequence[str], stdin: IO | None = None) -> Iterator[Item | BadInput]:
    """Enumerate files, directories (recursive, sorted) and ``-`` (stdin paths or JSONL) as unique Items.

    Problems with a single input become BadInput rows; enumeration never stops early.
    """

    def gen() -> Iterator[Item | BadInput]:
        for p in paths:
            if p == "-":
                yield from _read_stdin(stdin if stdin is not None else sys.stdin)
            else:
                yield from _expand_path(p)

    return unique_ids(gen())
