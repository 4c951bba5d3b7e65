"""``m3 batch``'s single-process engine: stream items, decode ahead, answer in batches, write rows in order.

Nothing here knows click. Images are decoded by a prefetch thread into a bounded queue, so
memory stays flat however many items stream through; a picture asked several questions is decoded once
and encoded once (a bounded encode cache spans batches); every row is written and flushed as
soon as it and all rows before it are done; a bad input becomes an error row, never a stop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from m3cli.answering.encode_cache import EncodeCache
from m3cli.backends.base import Backend
from m3cli.engines.units import BatchOptions, RecentKeys, Unit, answer_units, decode_input, done_for, unit_questions
from m3cli.media import BadInput, Item
from m3cli.output import OrderedWriter, Summary

__all__ = ["BatchOptions", "Prefetcher", "iter_units", "run_batch"]


def iter_units(inputs: Iterable[Item | BadInput], opts: BatchOptions) -> Iterator[Unit]:
    """Number the work in input order: each picture decoded once (images, a video's frames or its collage),
    then one unit per question about it. An image decoded shortly before (stdin rows sharing it) is not
    decoded again: its encoding is expected in the cache."""
    seq = 0
    sampling = opts.sampling
    recent = RecentKeys(opts.encode_cache)
    for item in inputs:
        for dec in decode_input(item, done_for(item, opts), sampling, recent, opts.image):
            for row_id, question in unit_questions(dec.item, opts):
                skip = dec.skip or row_id in opts.done_ids
                yield Unit(seq, dec.item, None if skip else dec.image, dec.error, skip, id=row_id,
                           question=question, key=dec.key, load=dec.load, frames=dec.frames, pixels=dec.pixels)
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
    units: Iterator[Unit] | None = None,
) -> None:
    """Answer every input and write its row; returns when all are written (or raises KeyboardInterrupt).

    ``units``: the work already numbered (an OpenAI Batch file's requests) instead of ``iter_units(inputs)``.
    Rows already written when interrupted stay written and flushed; nothing computed is lost.
    """
    prefetch = Prefetcher(units if units is not None else iter_units(inputs, opts),
                          opts.prefetch or 2 * opts.batch_size)
    cache = EncodeCache(opts.encode_cache)
    pending: list[Unit] = []
    try:
        for unit in prefetch:
            if unit.skip:
                writer.skip(unit.seq)
                summary.skip(failed=unit.row_id in opts.failed_ids)
                continue
            if unit.error is not None:  # no need to wait for a batch to report it
                _emit_all(writer, summary, on_row, answer_units(backend, [unit], opts, cache))
                continue
            pending.append(unit)
            if len(pending) >= opts.batch_size:
                _emit_all(writer, summary, on_row, answer_units(backend, pending, opts, cache))
                pending = []
        if pending:
            _emit_all(writer, summary, on_row, answer_units(backend, pending, opts, cache))
    finally:
        prefetch.close()


def _emit_all(writer: OrderedWriter, summary: Summary, on_row, rows: list[tuple[int, dict]]) -> None:
    for seq, row in rows:
        writer.put(seq, row)
        summary.add(row)
        if on_row is not None:
            on_row(row)
