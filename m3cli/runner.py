"""``m3 batch``'s engine: stream items, decode ahead, answer in batches, write rows in input order.

Nothing here knows click. Images are decoded by a prefetch thread into a bounded queue, so
memory stays flat however many items stream through; every row is written and flushed as
soon as it and all rows before it are done; a bad input becomes an error row, never a stop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from m3cli.answering import Query, answer_queries
from m3cli.backends.base import Backend
from m3cli.confidence import DEFAULT_MEASURE
from m3cli.media import BadInput, Item, MediaError, expand_video, load_image
from m3cli.output import OrderedWriter, Summary, make_row
from m3cli.policy import DEFAULT_THRESHOLD, Escalate, Fixed, make_ladder
from m3cli.scales import BudgetError, budget_to_scale

log = logging.getLogger(__name__)


@dataclass
class BatchOptions:
    """How every item is answered unless its own row (stdin JSONL) says otherwise."""

    question: str | None = None
    tokens: int | None = None
    auto_scale: bool = False
    threshold: float = DEFAULT_THRESHOLD
    ladder: list[int] | None = None
    batch_size: int = 8
    max_new_tokens: int = 16
    measure: str = DEFAULT_MEASURE
    fps: float | None = None
    every: int | None = None
    max_frames: int | None = None
    prefetch: int = 0  # queue depth; 0 means 2 x batch_size
    done_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)  # done ids whose earlier row is an error


@dataclass
class Unit:
    """One unit of work in input order: a loaded image, or an error to report."""

    seq: int
    item: Item | BadInput
    image: object | None = None
    error: str | None = None
    skip: bool = False


def policy_for(item: Item, opts: BatchOptions, grid: int):
    """The item's scale policy: its own budget (JSONL ``tokens``) or the run's, fixed or escalating."""
    tokens = item.tokens if item.tokens is not None else opts.tokens
    if opts.auto_scale:
        return Escalate(make_ladder(grid, opts.ladder, tokens), opts.threshold)
    return Fixed(budget_to_scale(tokens, grid).scale if tokens is not None else grid * grid)


def iter_units(inputs: Iterable[Item | BadInput], opts: BatchOptions) -> Iterator[Unit]:
    """Number the work in input order, decoding images and expanding videos into frames."""
    seq = 0
    for item in inputs:
        if isinstance(item, BadInput):
            yield Unit(seq, item, error=item.error, skip=item.id in opts.done_ids)
            seq += 1
        elif item.kind == "video":
            try:
                for frame_item, frame in expand_video(item, opts.fps, opts.every, opts.max_frames):
                    skip = frame_item.id in opts.done_ids
                    yield Unit(seq, frame_item, None if skip else frame.image, skip=skip)
                    seq += 1
            except (MediaError, ValueError) as exc:
                yield Unit(seq, item, error=str(exc), skip=item.id in opts.done_ids)
                seq += 1
        elif item.id in opts.done_ids:
            yield Unit(seq, item, skip=True)
            seq += 1
        else:
            try:
                yield Unit(seq, item, load_image(item.source))
            except MediaError as exc:
                yield Unit(seq, item, error=str(exc))
            seq += 1


class Prefetcher:
    """Runs ``iter_units`` in a daemon thread, a bounded queue ahead of the model."""

    _END = object()

    def __init__(self, units: Iterator[Unit], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fill, args=(units,), daemon=True, name="m3-prefetch")
        self._thread.start()

    def _fill(self, units: Iterator[Unit]) -> None:
        try:
            for unit in units:
                while not self._stop.is_set():
                    try:
                        self._queue.put(unit, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # surfaced in the consumer, never lost in the thread
            self._error = exc
        finally:
            while not self._stop.is_set():
                try:
                    self._queue.put(self._END, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> Iterator[Unit]:
        while True:
            unit = self._queue.get()
            if unit is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield unit

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_batch(
    backend: Backend,
    inputs: Iterable[Item | BadInput],
    opts: BatchOptions,
    writer: OrderedWriter,
    summary: Summary,
    on_row: Callable[[dict], None] | None = None,
) -> None:
    """Answer every input and write its row; returns when all are written (or raises KeyboardInterrupt).

    Rows already written when interrupted stay written and flushed; nothing computed is lost.
    """
    prefetch = Prefetcher(iter_units(inputs, opts), opts.prefetch or 2 * opts.batch_size)
    pending: list[Unit] = []
    try:
        for unit in prefetch:
            if unit.skip:
                writer.skip(unit.seq)
                summary.skip(failed=unit.item.id in opts.failed_ids)
                continue
            if unit.error is not None:  # no need to wait for a batch to report it
                _emit_all(writer, summary, on_row, answer_units(backend, [unit], opts))
                continue
            pending.append(unit)
            if len(pending) >= opts.batch_size:
                _emit_all(writer, summary, on_row, answer_units(backend, pending, opts))
                pending = []
        if pending:
            _emit_all(writer, summary, on_row, answer_units(backend, pending, opts))
    finally:
        prefetch.close()


def answer_units(backend: Backend, units: list[Unit], opts: BatchOptions) -> list[tuple[int, dict]]:
    """The per-batch step every engine shares: encode the loaded units once, run each item's policy,
    and return ``(seq, row)`` in input order; per-item problems become error rows, never exceptions."""
    rows: dict[int, dict] = {}
    ready: list[tuple[Unit, str, object]] = []
    for unit in units:
        question = getattr(unit.item, "question", None) or opts.question
        if unit.error is not None:
            rows[unit.seq] = _row(unit, backend, opts, error=unit.error)
        elif not question:
            rows[unit.seq] = _row(unit, backend, opts, error="no question: give -q or a 'question' field")
        else:
            try:
                ready.append((unit, question, policy_for(unit.item, opts, backend.grid_side)))
            except (BudgetError, ValueError) as exc:
                rows[unit.seq] = _row(unit, backend, opts, error=str(exc))
    if ready:
        try:
            encoded = backend.encode([u.image for u, _, _ in ready])
            queries = [Query(enc, q, pol, opts.max_new_tokens) for enc, (_, q, pol) in zip(encoded, ready, strict=True)]
            results = answer_queries(backend, queries, opts.measure)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory on one batch: report, keep going
            log.debug("batch failed", exc_info=True)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            for unit, _, _ in ready:
                rows[unit.seq] = _row(unit, backend, opts, error=f"model error: {message}")
        else:
            for (unit, question, _), result in zip(ready, results, strict=True):
                rows[unit.seq] = _row(unit, backend, opts, question=question, result=result)
    return sorted(rows.items())


def _row(unit: Unit, backend, opts: BatchOptions, question=None, result=None, error=None) -> dict:
    item = unit.item
    fields = {
        "id": item.id,
        "source": item.source,
        "frame": getattr(item, "frame", None),
        "time_s": getattr(item, "time_s", None),
        "question": question or getattr(item, "question", None) or opts.question,
        "model": backend.model_id,
        "backend": backend.name,
        "error": error,
    }
    if result is not None:
        fields.update(result.to_dict())
    return make_row(**fields)


def _emit_all(writer: OrderedWriter, summary: Summary, on_row, rows: list[tuple[int, dict]]) -> None:
    for seq, row in rows:
        writer.put(seq, row)
        summary.add(row)
        if on_row is not None:
            on_row(row)
