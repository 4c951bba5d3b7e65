"""In-order writing: rows finished out of order by workers go out in input order, each flushed at once."""

from __future__ import annotations

import threading
from typing import Any

from m3cli.output.sinks import RowSink


class OrderedWriter:
    """Writes rows tagged with sequence numbers 0, 1, 2, ... in sequence order, whatever order they arrive in.

    Each row is written and flushed as soon as it and every row before it are done; only rows that arrived
    ahead of a missing one are buffered, so memory is bounded by the out-of-order window. ``max_pending``
    turns that window into a hard limit (OverflowError beyond it), a guard against a producer that
    never fills a gap. Thread-safe: workers may call ``put``/``skip`` directly.
    """

    def __init__(self, sink: RowSink, max_pending: int | None = None) -> None:
        self.sink = sink
        self.max_pending = max_pending
        self._next = 0
        # seq -> row, or None for a skipped seq that arrived ahead of the next one.
        self._buffer: dict[int, dict[str, Any] | None] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.written = 0

    @property
    def next_seq(self) -> int:
        """The lowest sequence number not yet written or skipped."""
        return self._next

    @property
    def pending(self) -> int:
        """Sequence numbers received (rows or skips) but held back behind a missing earlier one."""
        return len(self._buffer)

    def put(self, seq: int, row: dict[str, Any]) -> None:
        """Hand over the row for ``seq``; writes it and any rows it was blocking."""
        self._accept(seq, row)

    def skip(self, seq: int) -> None:
        """Mark ``seq`` as producing no row (e.g. already done in a resumed run), letting later rows flow."""
        self._accept(seq, None)

    def _accept(self, seq: int, row: dict[str, Any] | None) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("OrderedWriter is closed")
            if seq < 0:
                raise ValueError(f"sequence numbers start at 0, got {seq}")
            if seq < self._next or seq in self._buffer:
                raise ValueError(f"sequence number {seq} given twice")
            if seq != self._next and self.max_pending is not None and len(self._buffer) >= self.max_pending:
                raise OverflowError(
                    f"{len(self._buffer)} rows waiting on sequence number {self._next} (max_pending={self.max_pending})"
                )
            self._buffer[seq] = row
            while self._next in self._buffer:
                ready = self._buffer.pop(self._next)
                self._next += 1
                if ready is not None:
                    self._emit(ready)

    def _emit(self, row: dict[str, Any]) -> None:
        self.sink.write(row)
        # Per-row flush: a crash or kill must not lose rows already reported as written.
        self.sink.flush()
        self.written += 1

    def close(self, past_gaps: bool = True) -> list[int]:
        """Close the sink and return the missing seqs; rows still buffered behind a gap are written (in order,
        past the gaps) when ``past_gaps``, else dropped.

        An empty list means every sequence number up to the highest seen was put or skipped. A non-empty
        result is a caller bug or an aborted run. A file that a run will resume must not get rows past a gap
        (the resumed rows would land after them, out of input order): ``m3 batch`` closes with
        ``past_gaps=False``, so its output is always an in-order prefix that the next run extends. Only gaps
        below the highest seen seq are known here: compare ``next_seq`` with the input count to catch
        trailing ones. Closing twice returns ``[]``. The sink is closed even if writing fails.
        """
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            missing: list[int] = []
            try:
                if self._buffer:
                    top = max(self._buffer)
                    missing = [s for s in range(self._next, top) if s not in self._buffer]
                    held = sorted(self._buffer) if past_gaps else []
                    for seq in held:
                        ready = self._buffer[seq]
                        if ready is not None:
                            self._emit(ready)
                    self._buffer.clear()
                    self._next = top + 1
            finally:
                self.sink.close()
            return missing
