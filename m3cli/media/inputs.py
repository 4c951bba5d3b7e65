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
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Literal, TypeVar

from m3cli.errors import describe
from m3cli.fileio import escape_surrogates
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
    """An input that could not become an Item; the caller writes it as an error row."""

    id: str
    source: str
    error: str


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
            log.debug("skipped special file or broken link: %s", entry.path)


def _expand_path(
    path: str, *, item_id: str | None = None, question: str | None = None, tokens: int | None = None
) -> Iterator[Item | BadInput]:
    """Items for one explicitly named path (file, video or directory)."""
    norm = os.path.normpath(path)
    if not os.path.exists(path):
        yield BadInput(id=item_id or norm, source=path, error=f"{path}: no such file or directory")
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
                id=os.path.normpath(os.path.join(root_id, rel)),
                source=fpath,
                kind=kind,  # type: ignore[arg-type]
                question=question,
                tokens=tokens,
            )
        return
    # An explicitly named file with an unknown extension is still tried as an image: the user asked for
    # it, and load_image gives a precise error if it is not one.
    kind = media_kind(path) or "image"
    yield Item(id=item_id or norm, source=path, kind=kind, question=question, tokens=tokens)


def _jsonl_row(line: str, lineno: int) -> Iterator[Item | BadInput]:
    where = f"stdin line {lineno}"
    bad_id = f"stdin:{lineno}"
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
    if not isinstance(image, str) or not image:
        yield BadInput(id=item_id or bad_id, source="-", error=f"{where}: missing or non-string 'image'")
        return
    question = row.get("question")
    tokens = row.get("tokens")
    problem = None
    if question is not None and not isinstance(question, str):
        problem = "'question' must be a string"
    elif question is not None and not question.strip():
        problem = "'question' is empty (leave it out to ask the run's question)"
    elif tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        problem = "'tokens' must be a positive integer"
    if problem:
        yield BadInput(id=item_id or os.path.normpath(image), source=image, error=f"{where}: {problem}")
        return
    yield from _expand_path(image, item_id=item_id, question=question, tokens=tokens)


def _stdin_lines(stdin: IO) -> Iterator[str]:
    """Lines of stdin as text; read as bytes where possible, so a path that is not valid UTF-8 keeps its bytes
    (``surrogateescape``, as the OS hands names to Python) whatever the stream's encoding or error mode."""
    binary = getattr(stdin, "buffer", None)
    if binary is None:  # already text (a StringIO in tests and library use)
        yield from stdin
        return
    for raw in binary:
        yield raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw


def _read_stdin(stdin: IO) -> Iterator[Item | BadInput]:
    for lineno, raw in enumerate(_stdin_lines(stdin), 1):
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
