"""Split one ``m3 batch`` job over a job array (``--shard K/N``) and merge the shard outputs back.

Each of N processes enumerates the FULL input stream and keeps the top-level items whose id hashes to its
shard (:func:`shard_of`: a stable hash, so adding files never moves other items; frames of a video follow
the video's id, so one process decodes each video). Its rows carry ``input_index``, the item's position in
the full stream, and a sidecar ``<output>.shard.json`` records the shard, the shard count, the size of the
full stream, whether the run finished and the run record (model, question, budget). A shard that got no
items is an empty file with its sidecar, and a valid shard. :func:`merge_outputs` refuses shards of
different runs (sidecars or rows whose ``run`` differ), puts the rows back in input order, keeps the last
row per id, strips ``input_index`` and says whether anything is missing, so the merged file is the one the
single-process run writes. It never writes an empty file for a merge that failed, and never writes over
one of its inputs (the output guard, :class:`m3cli.output.OutputFile`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from m3cli.errors import UsageError, describe
from m3cli.fileio import LineTooLong, atomic_write_text, escape_surrogates, iter_jsonl
from m3cli.output import JsonlSink, OutputFile, OutputWriteError, RowSink
from m3cli.output.resume import RUN_KEY, run_differences

if TYPE_CHECKING:  # media pulls in PyAV/numpy/Pillow; only its types are needed here
    from m3cli.media import BadInput, Item

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_KEY",
    "SIDECAR_SUFFIX",
    "IndexingSink",
    "MergeError",
    "MergeReport",
    "ShardSelector",
    "add_index",
    "merge_outputs",
    "parse_shard",
    "read_sidecar",
    "shard_of",
    "sidecar_path",
    "top_level_id",
    "write_sidecar",
]

INDEX_KEY = "input_index"
SIDECAR_SUFFIX = ".shard.json"
_QUESTION_SUFFIX = re.compile(r"#q([1-9][0-9]*)$")
_SHARD_RE = re.compile(r"([0-9]+)/([0-9]+)")
_SHOW = 5  # ids / entries named in a summary line before "…"


class MergeError(UsageError):
    """Shard outputs that cannot be merged (one line, naming the file): ``m3 merge`` was given the wrong files."""


# ------------------------------------------------------------------------------------------- sharding


def parse_shard(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N; anything else raises a one-line ValueError."""
    m = _SHARD_RE.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m:
        k, n = int(m.group(1)), int(m.group(2))
        if n >= 1 and k < n:
            return k, n
    raise ValueError(f"bad shard {spec!r}: expected K/N with integers 0 <= K < N, e.g. 0/4")


def shard_of(item_id: str, n: int) -> int:
    """The shard (0..n-1) of a top-level item id: blake2b-64 of its UTF-8 bytes, big-endian, mod n.

    Stable across processes, machines and Python versions (unlike ``hash()``), and independent of the
    other inputs. Pass a video's own id for its frames. Item ids are valid Unicode (a file name's
    undecodable bytes are escaped, see :func:`m3cli.fileio.escape_surrogates`), so an id hashes to the
    same shard as the ``id`` written in its row.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shard count must be an integer >= 1, got {n!r}")
    # surrogatepass: ids from undecodable file names still hash (and always to the same value).
    digest = hashlib.blake2b(str(item_id).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def add_index(row: dict[str, Any], input_index: int) -> dict[str, Any]:
    """A copy of ``row`` with ``input_index`` added as its last key (the row itself is left unchanged)."""
    if isinstance(input_index, bool) or not isinstance(input_index, int) or input_index < 0:
        raise ValueError(f"input_index must be an integer >= 0, got {input_index!r}")
    out = {k: v for k, v in row.items() if k != INDEX_KEY}
    out[INDEX_KEY] = input_index
    return out


def top_level_id(row: dict[str, Any]) -> str:
    """The id of the input a row came from: a frame row ``"<video id>#<frame>"`` gives the video's id."""
    ident = str(row.get("id"))
    frame = row.get("frame")
    if frame is not None:
        tail = f"#{frame}"
        if ident.endswith(tail) and len(ident) > len(tail):
            return ident[: -len(tail)]
    return ident


class ShardSelector:
    """Wrap the full input stream: yield only shard K's items, remember their ``input_index``, count all.

    ``index_of(row)`` maps a row (frame rows included) back to its input's index; ``total`` is the size of
    the full stream once it has been exhausted (None before), when ``on_end(total)`` is also called (e.g.
    to write the sidecar). ``index_of`` may be called from another thread for rows of yielded items.
    """

    def __init__(
        self,
        items: Iterable[Item | BadInput],
        k: int,
        n: int,
        on_end: Callable[[int], None] | None = None,
    ) -> None:
        if not (isinstance(n, int) and isinstance(k, int) and 0 <= k < n):
            raise ValueError(f"bad shard {k}/{n}: expected integers 0 <= K < N")
        self.items = items
        self.k = k
        self.n = n
        self.on_end = on_end
        self.total: int | None = None
        self.selected = 0
        self._index: dict[str, int] = {}

    def __iter__(self) -> Iterator[Item | BadInput]:
        count = 0
        for item in self.items:
            index = count
            count += 1
            if shard_of(item.id, self.n) == self.k:
                self._index[item.id] = index
                self.selected += 1
                yield item
        self.total = count
        if self.on_end is not None:
            self.on_end(count)

    def index_of(self, row: dict[str, Any]) -> int:
        ident = str(row.get("id"))
        if ident in self._index:  # images, bad inputs, a video's own error row
            return self._index[ident]
        try:
            return self._index[top_level_id(row)]
        except KeyError:
            raise KeyError(f"row {ident!r} is not from an input of shard {self.k}/{self.n}") from None


class IndexingSink:
    """A row sink that adds each row's ``input_index`` (from a :class:`ShardSelector`) before writing."""

    def __init__(self, inner: RowSink, selector: ShardSelector) -> None:
        self.inner = inner
        self.selector = selector

    def write(self, row: dict[str, Any]) -> None:
        self.inner.write(add_index(row, self.selector.index_of(row)))

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


# -------------------------------------------------------------------------------------------- sidecar


def sidecar_path(output_path: str | os.PathLike[str]) -> str:
    return os.fspath(output_path) + SIDECAR_SUFFIX


def write_sidecar(output_path: str | os.PathLike[str], k: int, n: int, inputs: int, complete: bool,
                  run: dict[str, Any] | None = None) -> str:
    """Atomically write ``<output>.shard.json`` (with the run record ``run``, when given); returns its path."""
    if not (isinstance(n, int) and isinstance(k, int) and 0 <= k < n):
        raise ValueError(f"bad shard {k}/{n}: expected integers 0 <= K < N")
    if isinstance(inputs, bool) or not isinstance(inputs, int) or inputs < 0:
        raise ValueError(f"inputs must be an integer >= 0, got {inputs!r}")
    path = sidecar_path(output_path)
    data: dict[str, Any] = {"shard": k, "of": n, "inputs": inputs, "complete": bool(complete)}
    if run is not None:
        data[RUN_KEY] = run
    try:
        atomic_write_text(path, json.dumps(data) + "\n")
    except OSError as exc:
        raise OutputWriteError(f"{escape_surrogates(path)}: cannot write ({describe(exc)})") from None
    return path


def read_sidecar(output_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``output_path`` as a dict, None if there is none; ValueError (one line) if malformed."""
    path = sidecar_path(output_path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok = (
        isinstance(data, dict)
        and is_int(data.get("shard"))
        and is_int(data.get("of"))
        and is_int(data.get("inputs"))
        and isinstance(data.get("complete"), bool)
        and 0 <= data["shard"] < data["of"]
        and data["inputs"] >= 0
        and isinstance(data.get(RUN_KEY, {}), dict)
    )
    if not ok:
        raise ValueError(f"{path}: not a shard sidecar (expected shard, of, inputs, complete)")
    return data


# ---------------------------------------------------------------------------------------------- merge


@dataclass
class MergeReport:
    """What :func:`merge_outputs` did and what the shard files lack.

    ``duplicates`` maps an id to the number of rows seen for it (>= 2; the last one was kept).
    ``checked`` is True when sidecars allowed a full cover check; without them trailing inputs and whole
    missing shards cannot be detected, so ``exact`` is False.
    """

    rows_written: int = 0
    files: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    incomplete_shards: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    skipped_lines: int = 0  # invalid / non-row / half-written lines ignored while reading
    checked: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return (
            self.checked
            and not self.missing
            and not self.duplicates
            and not self.incomplete_shards
            and not self.missing_shards
        )

    def summary(self) -> str:
        """E.g. ``merged 1203 rows from 4 shards; 2 duplicated ids (a.png, b.png); missing: none``."""
        parts = [f"merged {self.rows_written} rows from {self.files} shard{'s' if self.files != 1 else ''}"]
        if self.duplicates:
            parts.append(
                f"{len(self.duplicates)} duplicated id{'s' if len(self.duplicates) != 1 else ''}"
                f" ({_listing(list(self.duplicates))})"
            )
        else:
            parts.append("no duplicated ids")
        missing = [f"shard {k}" for k in self.missing_shards] + self.missing
        parts.append(f"missing: {_listing(missing) if missing else 'none'}")
        if self.incomplete_shards:
            parts.append("incomplete shards: " + ", ".join(map(str, self.incomplete_shards)))
        if self.skipped_lines:
            parts.append(f"{self.skipped_lines} unreadable line{'s' if self.skipped_lines != 1 else ''} ignored")
        parts.extend(self.notes)
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", … ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def _read_rows(path: str, report: MergeReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each complete, valid row line; the file is never modified.

    Same rules as :func:`m3cli.output.read_done_ids`: an unterminated last line is ignored even if it
    parses, as are lines that are not JSON objects with an id.
    """
    from m3cli.fileio import input_problem

    problem = input_problem(path)
    if problem is not None:
        raise MergeError(f"{path}: {problem}")
    try:
        f = open(path, "rb")  # closed by the with below
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            for lineno, _, raw, row in iter_jsonl(f):
                if not raw.endswith(b"\n"):
                    log.warning("%s:%d: half-written last line, ignored", path, lineno)
                    report.skipped_lines += 1
                    break
                if not raw.strip():
                    continue
                if isinstance(row, Exception):
                    log.warning("%s:%d: not valid JSON, ignored", path, lineno)
                    report.skipped_lines += 1
                    continue
                if not isinstance(row, dict) or row.get("id") is None:
                    log.warning("%s:%d: not a result row, ignored", path, lineno)
                    report.skipped_lines += 1
                    continue
                yield lineno, row
        except LineTooLong as exc:
            raise MergeError(f"{path}: {exc}, so this is not m3 batch output") from None


class _Runs:
    """The run record every merged shard must share: from the first sidecar or row that has one."""

    def __init__(self) -> None:
        self.first: tuple[str, Any] | None = None  # (where, record)

    def check(self, where: str, record: Any) -> None:
        if self.first is None:
            self.first = (where, record)
            return
        if record != self.first[1]:
            first_where, first = self.first
            if isinstance(first, dict) and isinstance(record, dict):
                how = f"made with {run_differences(first, record, escape_surrogates(where))}"
            else:
                how = "one of them has no run record"
            raise MergeError(f"shards of different runs: {escape_surrogates(first_where)} and "
                             f"{escape_surrogates(where)} differ ({how}); merge the shards of one run only")


def _load_sidecars(paths: Sequence[str], report: MergeReport, runs: _Runs | None = None
                   ) -> tuple[int, int] | None:
    """(N, inputs) agreed by the sidecars, None when there are none; fills missing/incomplete shards."""
    cars: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            car = read_sidecar(path)
        except ValueError as e:
            raise MergeError(str(e)) from None
        if car is not None:
            cars[path] = car
    if not cars:
        return None
    first_path, first = next(iter(cars.items()))
    for path, car in cars.items():
        if runs is not None and RUN_KEY in car:
            runs.check(sidecar_path(path), car[RUN_KEY])
        if (car["of"], car["inputs"]) != (first["of"], first["inputs"]):
            raise MergeError(
                f"shards of different runs: {first_path} is one of {first['of']} shards over {first['inputs']}"
                f" inputs, {path} one of {car['of']} over {car['inputs']}"
            )
    for path in paths:
        if path not in cars:
            report.missing.append(f"{path} (no {SIDECAR_SUFFIX} sidecar)")
    n, inputs = first["of"], first["inputs"]
    complete: dict[int, bool] = {}
    for car in cars.values():  # a shard given twice (e.g. rerun into another file) is complete if either is
        complete[car["shard"]] = complete.get(car["shard"], False) or car["complete"]
    report.missing_shards = [k for k in range(n) if k not in complete]
    report.incomplete_shards = sorted(k for k, done in complete.items() if not done)
    return n, inputs


def merge_outputs(paths: Sequence[str], out_path: str | None, overwrite: bool = False) -> MergeReport:
    """Merge shard JSONL outputs into input order (see the module doc); stdout when ``out_path`` is None/"-".

    The last row per id wins (files in the order given, lines in file order). Rows are ordered by
    ``(input_index, frame, id)``; a video's own row (its error, frame None) goes before its frames when it
    has none and after them otherwise, where the single-process run writes it. Raises MergeError for rows
    without a usable ``input_index`` or shards of different runs (sidecars or rows with another ``run``);
    OutputError for an output that is one of the shards, or an existing file without ``overwrite``, before
    anything is read. Nothing is written on error, nor when the merge is not exact and has no row at all.
    """
    paths = [os.fspath(p) for p in paths]
    target = None
    if out_path is not None and os.fspath(out_path) != "-":
        shards = paths + [sidecar_path(p) for p in paths]
        target = OutputFile.check(os.fspath(out_path), "-o", overwrite=overwrite, results=True, inputs=shards,
                                  create_parent=True)
    report = MergeReport(files=len(paths))
    runs = _Runs()
    cover = _load_sidecars(paths, report, runs)

    rows: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for path in paths:
        for lineno, row in _read_rows(path, report):
            index = row.get(INDEX_KEY)
            if index is None:
                raise MergeError(f"{path}:{lineno}: row has no {INDEX_KEY} (not written by m3 batch --shard)")
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise MergeError(f"{path}:{lineno}: bad {INDEX_KEY} {index!r}")
            if cover is not None and index >= cover[1]:
                raise MergeError(f"{path}:{lineno}: {INDEX_KEY} {index} but the sidecars say {cover[1]} inputs")
            runs.check(path, row.get(RUN_KEY))
            ident = str(row["id"])
            seen[ident] = seen.get(ident, 0) + 1
            rows.pop(ident, None)  # keep dict order = order of the kept (last) rows
            rows[ident] = row
    report.duplicates = {ident: count for ident, count in seen.items() if count > 1}

    with_frames = {r[INDEX_KEY] for r in rows.values() if r.get("frame") is not None}

    def key(r: dict[str, Any]) -> tuple[int, float, int, str]:
        frame = r.get("frame")
        if not isinstance(frame, (int, float)) or isinstance(frame, bool):
            frame = float("inf") if r[INDEX_KEY] in with_frames else -1
        # several -q: ids end in #q1, #q2, ...; compare the number, or #q10 would sort before #q2
        asked = _QUESTION_SUFFIX.search(str(r["id"]))
        return r[INDEX_KEY], frame, int(asked[1]) if asked else 0, str(r["id"])

    ordered = sorted(rows.values(), key=key)

    present = {r[INDEX_KEY] for r in ordered}
    if cover is not None:
        report.checked = True
        report.missing.extend(f"input #{i} (no row)" for i in range(cover[1]) if i not in present)
    else:
        top = max(present, default=-1)
        report.missing.extend(f"input #{i} (no row)" for i in range(top + 1) if i not in present)
        report.notes.append(f"no {SIDECAR_SUFFIX} sidecars: inputs after #{top} and whole shards unchecked")

    if not ordered and not report.exact:
        report.notes.append("nothing written" if target is not None else "nothing merged")
        return report
    _write_rows(({k: v for k, v in r.items() if k != INDEX_KEY} for r in ordered), target)
    report.rows_written = len(ordered)
    return report


def _write_rows(rows: Iterable[dict[str, Any]], target: OutputFile | None) -> None:
    if target is None:
        sink = JsonlSink(sys.stdout, owns=False)
        for row in rows:
            sink.write(row)
        sink.close()
        return
    with target.open() as stream:  # atomic: a failure leaves nothing (or the old file), never half a merge
        sink = JsonlSink(stream, owns=False)
        for row in rows:
            sink.write(row)
        sink.flush()
