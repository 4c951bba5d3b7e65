"""The Ray engine against the single process: per-row arrival times, so start-up is measured apart.

Ray itself is reached through :mod:`m3cli.engines.ray_cluster` (this module's name shadows nothing: imports
are absolute).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m3cli.backends.base import Backend
from m3cli.bench.scenes import BENCH_QUESTION
from m3cli.bench.throughput import batch_throughput


@dataclass
class StreamTiming:
    """One engine run over a stream of items, timed per row as rows reach the writer."""

    label: str
    items: int
    first_batch_s: float  # call start -> the first batch's last row (start-up + one batch)
    total_s: float  # call start -> last row
    steady_items_per_s: float  # rows after the first batch / time after the first batch
    late_items_per_s: float  # the second half of the rows / its time (start-up transients are over)


class RowClock:
    """An ``on_row`` callback that stamps the arrival time of every row."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, row: dict) -> None:
        self.stamps.append(time.perf_counter())

    def timing(self, label: str, batch_size: int) -> StreamTiming:
        n = len(self.stamps)
        if n == 0:
            raise RuntimeError("no rows were written")
        first = min(batch_size, n) - 1
        after = self.stamps[-1] - self.stamps[first]
        steady = (n - 1 - first) / after if after > 0 and n - 1 > first else float("nan")
        half = n // 2
        late_time = self.stamps[-1] - self.stamps[half]
        late = (n - 1 - half) / late_time if late_time > 0 and n - 1 > half else float("nan")
        return StreamTiming(label, n, self.stamps[first] - self.start, self.stamps[-1] - self.start, steady, late)


@dataclass
class ScaleOutReport:
    engines: list[list[StreamTiming]]  # per engine (the single process first), its timed runs
    repeat: int
    ray_init_s: float | None  # None: Ray was already running (not started by the bench)
    ray_shutdown_s: float | None
    warm_up_s: float  # one short untimed Ray run first: the cluster's worker processes start there
    warm_up_items: int


def single_process_stream(backend: Backend, paths: Sequence[str], tokens: int, batch_size: int,
                          max_new_tokens: int) -> StreamTiming:
    """``m3 batch`` in this process (model already loaded), rows to a null sink."""
    clock = RowClock()
    batch_throughput(backend, paths, BENCH_QUESTION, tokens, batch_size, max_new_tokens, on_row=clock)
    return clock.timing("single process (`m3 batch`)", batch_size)


def ray_stream(model_kw: dict, paths: Sequence[str], tokens: int, batch_size: int, max_new_tokens: int,
               actors: int) -> StreamTiming:
    """``m3 batch --engine ray --actors N`` against the already connected cluster, rows to a null sink.

    Every call starts its own actors, so ``first_batch_s`` holds the actors' start-up and model load."""
    import io

    from m3cli.engines.ray import run_ray
    from m3cli.engines.units import BatchOptions
    from m3cli.media import iter_inputs
    from m3cli.output import JsonlSink, OrderedWriter, Summary

    opts = BatchOptions(question=BENCH_QUESTION, tokens=tokens, batch_size=batch_size, max_new_tokens=max_new_tokens)
    clock = RowClock()
    run_ray(model_kw, iter_inputs(list(paths)), opts, OrderedWriter(JsonlSink(io.StringIO())), Summary(),
            actors=actors, on_row=clock)
    return clock.timing(f"Ray, {actors} actor{'s' if actors > 1 else ''}", batch_size)


def scale_out(backend: Backend, model_kw: dict, paths: Sequence[str], tokens: int = 9, batch_size: int = 8,
              max_new_tokens: int = 4, actor_counts: Sequence[int] = (1, 2), ray_address: str | None = None,
              repeat: int = 3, progress: Callable[[], None] | None = None) -> ScaleOutReport:
    """Single process against ``--engine ray`` with each actor count, each timed ``repeat`` times (the Ray runs
    alternating between the actor counts); Ray's own start and stop timed apart."""
    from m3cli.engines.ray_cluster import connect, import_ray

    def tick() -> None:
        if progress:
            progress()

    single_process_stream(backend, paths[:batch_size], tokens, batch_size, max_new_tokens)  # warm-up
    engines: list[list[StreamTiming]] = [[] for _ in range(1 + len(actor_counts))]
    for _ in range(repeat):
        engines[0].append(single_process_stream(backend, paths, tokens, batch_size, max_new_tokens))
        tick()
    ray = import_ray()
    t0 = time.perf_counter()
    owned = connect(ray, ray_address)
    init_s = time.perf_counter() - t0 if owned else None
    shutdown_s = None
    try:
        warm_up = paths[: 2 * batch_size]
        t0 = time.perf_counter()  # as the single process is warmed up, so is the cluster: workers start here
        ray_stream(model_kw, warm_up, tokens, batch_size, max_new_tokens, max(actor_counts))
        warm_up_s = time.perf_counter() - t0
        for _ in range(repeat):
            for i, actors in enumerate(actor_counts, start=1):
                engines[i].append(ray_stream(model_kw, paths, tokens, batch_size, max_new_tokens, actors))
                tick()
    finally:
        if owned:
            t0 = time.perf_counter()
            ray.shutdown()
            shutdown_s = time.perf_counter() - t0
    return ScaleOutReport(engines, repeat, init_s, shutdown_s, warm_up_s, len(warm_up))
