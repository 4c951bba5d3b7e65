"""MMBench / VLMEvalKit TSV files for ``m3 eval --data``: rows, embedded images and LLaVA's MMBench prompt.

The layout (VLMEvalKit's, which MMBench's own files use): a tab-separated file with a header naming
``index`` (an integer), ``question``, ``hint``, option columns ``A``, ``B``, ``C``, ``D`` (``E``... in some
files), ``answer`` (the gold letter; absent or empty in test splits), ``category``, ``l2-category``,
``split`` and ``image``: the picture as base64, or the ``index`` of another row whose picture it shares.
Rows whose ``index`` is 1,000,000 or more are the file's own CircularEval copies of row ``index % 1e6``
(:mod:`m3cli.eval.circular` groups them).

Cells are read as LLaVA's ``llava/eval/model_vqa_mmbench.py`` reads them with ``pandas.read_table``: a cell
that pandas takes for a missing value (empty, ``NaN``, ``nan``, ``NA``, ``None``, ``NULL``, ``#N/A``, ...) or
that reads ``nan``/``none`` in any case is missing; all others are kept exactly as written (no trimming).
The options are ``A``, ``B``, ... in order, cut at the first missing one (LLaVA's ``get_options``; LLaVA reads
only ``A``-``D``, MMBench files have at most four, and an ``E`` column is read on as VLMEvalKit does).

The prompt (LLaVA, ``--single-pred-prompt``): ``hint + "\\n" + question`` when the hint is present, else the
question; then ``"\\n" + letter + ". " + option`` per option; the model sees that text after ``<image>\\n`` in
its conversation, followed by ``"\\n"`` and the instruction (``--prompt-suffix``, by default
``Answer with the option's letter from the given choices directly.``). The answer is read as MMBench's
exact matching reads it (metric ``mmbench``: :func:`m3cli.eval.scoring.infer_option`).

Images are decoded in memory when a row is answered (never written anywhere): a row keeps only the byte
offset of its record, so a large TSV is not held in memory, and rows sharing a picture (an ``image`` cell
naming another row, a circular copy) share one encode-cache key, hence one encode. Lines are read through
the one bounded reader (:data:`MAX_TSV_LINE_BYTES`; a longer line stops the run before any work, in one line).

A row's content key (what ``--resume`` matches, :mod:`m3cli.eval.data`) is a hash of its ``index``, hint,
question, options, gold, category and the content of its picture cell (the owner row's, for a row naming
another), never of its place in the file: a reordered or re-downloaded file resumes, a changed picture or
question is evaluated again.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from m3cli.errors import MediaError, UsageError, describe
from m3cli.eval.data import BadRow, EvalRow, raw_key
from m3cli.eval.scoring import choice_letters
from m3cli.fileio import MAX_LINE_BYTES, LineTooLong, content_hash, iter_lines

#: Missing-value spellings of ``pandas.read_table`` (its default ``na_values``), which LLaVA's script uses.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit: a circular copy of row i has index i + k * 1e6
_REQUIRED = ("index", "question", "A", "B")
_REF_MAX = 64  # VLMEvalKit: an image cell of at most 64 characters names another row
_FIELD_LIMIT = 2**31 - 1  # base64 images are far longer than the csv module's default 128 KiB field limit
# The longest TSV line read: the bounded reader's 16 MiB, far above a real row (MMBench's base64 pictures are well
# under 1 MB), so a file without newlines stops at once with one line instead of filling memory.
MAX_TSV_LINE_BYTES = MAX_LINE_BYTES


def is_mmbench_header(names: Sequence[str]) -> bool:
    """Whether a TSV header is MMBench's / VLMEvalKit's (``index``, ``question``, ``A``, ``B`` columns)."""
    return all(name in names for name in _REQUIRED)


def is_missing(cell: str | None) -> bool:
    """A missing cell as LLaVA's script sees it: pandas' missing-value spellings, or ``nan``/``none`` in any case."""
    return cell is None or cell in PANDAS_NA or cell.lower() in ("nan", "none")


def lay_out(question: str, hint: str | None, options: Sequence[str]) -> str:
    """LLaVA's MMBench text: the hint and question, then one ``"\\n<letter>. <option>"`` per option."""
    text = question if hint is None else hint + "\n" + question
    return text + "".join(f"\n{letter}. {option}" for letter, option in zip(choice_letters(len(options)), options,
                                                                             strict=True))


# --- reading records with their byte offsets -------------------------------------------------------


class _Lines:
    """Decoded lines of a binary file, remembering the byte offset of the next line (for re-reading a record).

    Read through the one bounded line reader: a line over :data:`MAX_TSV_LINE_BYTES` raises
    :class:`~m3cli.fileio.LineTooLong`.
    """

    def __init__(self, fh: IO[bytes]) -> None:
        self.offset = fh.tell()
        self.line = 0  # lines handed out
        self.first = self.offset == 0
        self.raw = iter_lines(fh, MAX_TSV_LINE_BYTES)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = next(self.raw)  # StopIteration at the end; LineTooLong for a line over the limit
        self.offset += len(raw)
        self.line += 1
        text = raw.decode("utf-8-sig" if self.first else "utf-8", errors="replace")
        self.first = False
        return text


def _records(fh: IO[bytes]) -> Iterator[tuple[int, int, list[str] | csv.Error]]:
    """``(byte offset, line, cells)`` of each non-blank record (cells: the csv error of a malformed one)."""
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    lines = _Lines(fh)
    reader = csv.reader(lines, delimiter="\t")
    while True:
        offset, line = lines.offset, lines.line + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield offset, line, exc
            continue
        if cells:
            yield offset, line, cells


@dataclass(frozen=True)
class TsvImage:
    """The picture of row ``owner`` of an MMBench TSV: decoded from its base64 cell when first needed."""

    path: str
    identity: tuple[str, int, int]  # the file's (resolved path, size, mtime): a changed file is a new image
    offset: int  # where the owner row's record starts
    column: int
    owner: str  # the owner row's index
    digest: str | None = None  # a hash of the picture cell's content (the rows' content keys name it)

    @property
    def key(self) -> tuple[Any, ...]:
        """The encode-cache key: every row showing this picture shares it."""
        return ("mmbench", *self.identity, self.owner)

    def open(self) -> io.BytesIO:
        """The picture's encoded bytes as a stream named after the file and row, for the image loader
        (MediaError naming them for a cell that cannot be read again or is not base64)."""
        name = f"{self.path} (index {self.owner})"
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                _offset, _line, cells = next(_records(fh))
        except (OSError, StopIteration, LineTooLong) as exc:
            raise MediaError(f"{name}: cannot read the image cell ({describe(exc)})") from None
        if isinstance(cells, csv.Error) or self.column >= len(cells):
            raise MediaError(f"{name}: the image cell cannot be read again (the file changed?)")
        try:
            data = base64.b64decode(cells[self.column])
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"{name}: the image cell is not base64 ({describe(exc)})") from None
        stream = io.BytesIO(data)
        stream.name = name
        return stream

    def load(self):
        """The picture decoded with the default (recipe) image options."""
        from m3cli.media import load_image

        return load_image(self.open())


@dataclass
class _Raw:
    line: int
    offset: int
    cells: dict[str, str]  # every cell but the picture
    picture: int | str | None  # "own" (a base64 cell), the index of the row it names, or None (no picture)
    digest: str | None = None  # a hash of its own picture cell: the picture's identity in the row's content key


def _identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _option_columns(names: Sequence[str]) -> list[str]:
    """``A``, ``B``, ... as far as the header has them in sequence."""
    out = []
    for letter in choice_letters(26):
        if letter not in names:
            break
        out.append(letter)
    return out


def _as_index(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _picture_of(cell: str | None) -> int | str | None:
    """What an ``image`` cell holds: "own" (base64), the index of the row it names, or None (nothing)."""
    if is_missing(cell):
        return None
    if len(cell) <= _REF_MAX and _as_index(cell) is not None:  # type: ignore[arg-type]
        return _as_index(cell)
    return "own"


def iter_rows(fh: IO[bytes], path: str) -> Iterator[EvalRow | BadRow]:
    """The rows of an MMBench TSV (``fh`` open at its start), in file order; ids are the ``index`` values.

    The whole file is scanned once first (keeping offsets, not pictures) so that an ``image`` cell naming a
    later row resolves too.
    """
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    records = _records(fh)
    try:
        head = next(records, None)
        if head is None or isinstance(head[2], csv.Error):
            return
        names = [c.strip() for c in head[2]]
        image_col = names.index("image") if "image" in names else None
        raws: list[_Raw | BadRow] = []
        owners: dict[int, _Raw] = {}  # index -> the first row with that index holding a picture of its own
        for offset, line, cells in records:
            if isinstance(cells, csv.Error):
                raws.append(BadRow(f"{stem}:{line}", path, line, f"not valid TSV ({describe(cells)})",
                                   raw_key([os.path.basename(path), line, describe(cells)])))
                continue
            if len(cells) < len(names):
                cells = cells + [""] * (len(names) - len(cells))  # pandas reads short rows' missing cells as NaN
            row = dict(zip(names, cells, strict=False))
            raw = _Raw(line, offset, {k: v for k, v in row.items() if k != "image"}, _picture_of(row.get("image")))
            if raw.picture == "own":
                raw.digest = content_hash(row["image"].strip())
            raws.append(raw)
            index = _as_index(row.get("index"))
            if raw.picture == "own" and index is not None:
                owners.setdefault(index, raw)
    except LineTooLong as exc:
        raise UsageError(f"{path}: {exc}; an MMBench row's base64 picture is normally well under 1 MB, so this is "
                         "not an MMBench TSV (or a picture in it is far larger than MMBench's)") from None
    if image_col is None:
        raise UsageError(f"{path}: the MMBench TSV has no 'image' column")
    identity = _identity(path)
    options = _option_columns(names)
    for raw in raws:
        yield raw if isinstance(raw, BadRow) else _row(raw, path, stem, identity, options, image_col, owners)


def _picture(raw: _Raw, index: int, path: str, identity: tuple[str, int, int], image_col: int,
             owners: dict[int, _Raw]) -> TsvImage | str:
    """The row's picture, or why it has none."""
    if raw.picture is None:
        return "no image (the 'image' cell is empty)"
    if raw.picture == "own":
        return TsvImage(path, identity, raw.offset, image_col, str(index), raw.digest)
    owner = owners.get(raw.picture)  # type: ignore[arg-type]
    if owner is None:
        return f"'image' names row {raw.picture}, which has no picture of its own"
    return TsvImage(path, identity, owner.offset, image_col, str(raw.picture), owner.digest)


def _row(raw: _Raw, path: str, stem: str, identity: tuple[str, int, int], option_names: list[str],
         image_col: int, owners: dict[int, _Raw]) -> EvalRow | BadRow:
    cells = raw.cells
    bad_key = raw_key([cells, raw.digest, raw.picture])  # a row that cannot be used: named by what it holds
    index = _as_index(cells.get("index"))
    if index is None:
        return BadRow(f"{stem}:{raw.line}", path, raw.line,
                      f"'index' must be an integer (got {cells.get('index')!r})", bad_key)
    row_id = str(index)
    question = cells.get("question")
    if is_missing(question):
        return BadRow(row_id, path, raw.line, "missing field 'question'", bad_key)
    options: list[str] = []
    for name in option_names:
        value = cells.get(name)
        if is_missing(value):
            break
        options.append(value)  # type: ignore[arg-type]  # not missing: a string
    if len(options) < 2:
        return BadRow(row_id, path, raw.line, f"needs at least options A and B (found {len(options)})", bad_key)
    letters = choice_letters(len(options))
    answer = cells.get("answer")
    if is_missing(answer):
        kind, gold = "none", ()
    elif answer.strip().upper() in letters:  # type: ignore[union-attr]
        kind, gold = "choice", (answer.strip().upper(),)  # type: ignore[union-attr]
    else:
        return BadRow(row_id, path, raw.line, f"'answer' {answer!r} is not one of the option letters {letters}",
                      bad_key)
    picture = _picture(raw, index, path, identity, image_col, owners)
    if isinstance(picture, str):
        return BadRow(row_id, path, raw.line, picture, bad_key)
    hint = cells.get("hint")
    hint = None if is_missing(hint) else hint
    category = cells.get("category")
    category = None if is_missing(category) else category
    meta: dict[str, Any] = {"format": "mmbench", "index": index, "hint": hint, "category": category}
    for name in ("l2-category", "split", "source"):
        if name in cells and not is_missing(cells[name]):
            meta[name] = cells[name]
    meta |= {"options": list(options), "option_char": list(letters), "rotated": 0}
    # what makes the row this row, wherever it stands: its index, text, options, gold and picture (by content)
    key = content_hash("mmbench", index, question, hint, options, kind, gold, category, picture.digest)
    return EvalRow(row_id, f"{path}#{picture.owner}", question, kind, gold, tuple(options),  # type: ignore[arg-type]
                   category, path, raw.line, key, prompt=lay_out(question, hint, options),  # type: ignore[arg-type]
                   metric="mmbench" if kind == "choice" else None, image_source=picture, meta=meta)
