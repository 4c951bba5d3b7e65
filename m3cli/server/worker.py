"""The model worker: one thread owns the backend and answers queued requests in micro-batches.

Requests wait in a bounded queue (full: :class:`QueueFull`, a 429). Each time the model is free the worker
takes every request waiting, up to ``max_batch``, and answers them together through
:func:`m3cli.answering.core.answer_asks`, the core ``m3 batch`` and ``m3 ask`` run: each image encoded once,
mixed budgets in one batch, each request's own escalation. A request dropped before its batch starts (its
client went away, or timed out) costs nothing; one already in a batch is finished and its answer discarded.
A failure of the model on one request is that request's error alone (``answer_asks`` retries the batch one
by one), and an unexpected exception fails that batch's requests, never the worker.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from m3cli.answering.core import DEFAULT_MAX_QUESTION_CHARS, Ask, Result, answer_asks
from m3cli.backends.base import Backend

log = logging.getLogger(__name__)

_STOP = object()


class QueueFull(Exception):
    """No room in the queue; ``retry_after`` is a guess, in whole seconds, of when there will be."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One queued request: what to answer, and the future its :class:`Result` arrives in."""

    ask: Ask
    future: Future = field(default_factory=Future)

    def drop(self) -> None:
        """Give the job up: it is skipped if its batch has not started (a started one is finished and ignored)."""
        self.future.cancel()


class ModelWorker:
    """The thread that owns ``backend``; :meth:`submit` queues a request, :meth:`stop` drains and ends."""

    def __init__(self, backend: Backend, max_queue: int = 64, max_batch: int = 8,
                 max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS) -> None:
        self.backend = backend
        self.max_batch = max(1, max_batch)
        self.max_question_chars = max_question_chars
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._thread = threading.Thread(target=self._loop, name="m3-model", daemon=True)
        self._seconds_per_item = 1.0   # running estimate, for Retry-After
        self._open = 0                 # submitted and not yet answered or dropped
        self._lock = threading.Lock()
        self.batches = 0               # model batches run (the tests read it)
        self.answered = 0

    def start(self) -> None:
        self._thread.start()

    def warm_up(self) -> None:
        """Answer one throw-away question at the smallest and the largest scale before the first client: the
        first model calls pay one-off costs (allocations, kernel selection) no request should wait for."""
        from PIL import Image

        from m3cli.matryoshka.policy import Fixed

        picture = Image.new("RGB", (64, 64), (128, 128, 128))
        scales = sorted({min(self.backend.scales), max(self.backend.scales)})
        asks = [Ask(picture, "What is this?", Fixed(s), 1) for s in scales]
        try:
            answer_asks(self.backend, asks, None, None)
        except Exception as exc:  # noqa: BLE001 - a warm-up is optional; real requests report their own errors
            log.warning("warm-up failed: %s: %s", type(exc).__name__, exc)

    @property
    def queued(self) -> int:
        """Requests waiting for the model."""
        return self._queue.qsize()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet answered or dropped (waiting or in the running batch)."""
        return self._open

    def _closed(self, _future: Future) -> None:
        with self._lock:
            self._open -= 1

    def submit(self, ask: Ask) -> Job:
        """Queue ``ask``; raises :class:`QueueFull` when the queue is full."""
        job = Job(ask)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self._retry_after()) from None
        with self._lock:
            self._open += 1
        job.future.add_done_callback(self._closed)
        return job

    def _retry_after(self) -> int:
        waiting = self._queue.qsize()
        return max(1, math.ceil(waiting * self._seconds_per_item / self.max_batch))

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end the thread."""
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if live:
                self._answer(live)
            if stop:  # stop() comes once the server has answered every request: nothing is left behind
                return

    def _answer(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        try:
            results: list[Result] = answer_asks(self.backend, [job.ask for job in jobs], None,  # each policy's measure
                                                self.max_question_chars)
        except Exception as exc:  # noqa: BLE001 - a bug: these requests fail (500), the worker goes on
            log.error("answering a batch of %d failed: %s: %s", len(jobs), type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            for job in jobs:
                job.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * elapsed / len(jobs)
        self.batches += 1
        self.answered += len(jobs)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
