"""One ``m3 batch`` run from start to exit code: resume, shard selection, sinks, progress, engine choice.

:func:`run_job` is what the CLI calls once it has parsed the flags; it knows no click and prints nothing
but the optional progress bar on stderr. Problems found before any work are one-line
:class:`~m3cli.errors.UsageError` / :class:`~m3cli.errors.M3Error` exceptions (exit code 2); the outcome of
a run that started is a :class:`JobResult`, whose ``exit_code`` is 0 (all answered), 1 (error rows, or an
engine that stopped part-way) or 130 (interrupted).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from m3cli.engines import EngineRunError
from m3cli.engines.units import BatchOptions
from m3cli.errors import UsageError
from m3cli.output import OrderedWriter, RowSink, Summary

ENGINES = ("local", "ray")


@dataclass
class BatchJob:
    """Everything ``m3 batch`` was asked to do."""

    inputs: list[str]
    options: BatchOptions = field(default_factory=BatchOptions)
    model: dict[str, Any] = field(default_factory=dict)  # open_backend's keyword arguments
    output: str | None = None  # None: stdout
    fmt: str = "jsonl"
    resume: bool = False
    retry_errors: bool = False
    shard: tuple[int, int] | None = None  # (K, N)
    engine: str = "local"
    ray_address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    progress: bool | None = None  # None: when stderr is a terminal

    def check(self) -> None:
        """Raise :class:`UsageError` for options that cannot go together."""
        opts = self.options
        if opts.fps is not None and opts.every is not None:
            raise UsageError("--fps and --every cannot be combined")
        to_jsonl_file = bool(self.output) and self.fmt == "jsonl"
        if self.resume and not to_jsonl_file:
            raise UsageError("--resume needs -o FILE in jsonl format")
        if self.shard is not None and not to_jsonl_file:
            raise UsageError("--shard needs -o FILE in jsonl format")
        if self.retry_errors and not self.resume:
            raise UsageError("--retry-errors goes with --resume")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine != "ray" and (self.ray_address is not None or self.actors != 1 or self.gpus_per_actor):
            raise UsageError("--ray-address, --actors and --gpus-per-actor go with --engine ray")


@dataclass
class JobResult:
    """How a run that started ended."""

    summary: Summary
    interrupted: bool = False
    incomplete: str | None = None  # the engine stopped part-way: why

    @property
    def exit_code(self) -> int:
        if self.incomplete:
            return 1
        if self.interrupted:
            return 130
        return 1 if self.summary.failed or self.summary.skipped_failed else 0

    def report(self) -> list[str]:
        """The closing lines for stderr (the CLI prefixes them with ``m3 batch: ``)."""
        if self.incomplete:
            return [f"error: {self.incomplete}", f"{self.summary.line()} (incomplete; rerun with --resume)"]
        return [self.summary.line() + (" (interrupted; rerun with --resume)" if self.interrupted else "")]


def run_job(job: BatchJob) -> JobResult:
    """Run ``job``: every input answered once, rows in input order, the output resumable if it stops."""
    from m3cli.media import iter_inputs
    from m3cli.output import open_sink

    job.check()
    if job.engine == "ray":
        from m3cli.engines.ray import preflight

        preflight(job.model, job.ray_address)  # EngineError (exit 2) before the output file is touched
    opts = _resumed_options(job)
    backend = _open_local_backend(job, opts) if job.engine == "local" else None
    items: Iterable = iter_inputs(list(job.inputs))
    sink: RowSink = open_sink(job.fmt, job.output, append=job.resume)
    selector = None
    if job.shard is not None:
        items, sink, selector = _select_shard(job, items, sink)
    writer = OrderedWriter(sink)
    result = JobResult(Summary())
    bar = _progress_bar(job.progress)
    on_row = (lambda row: bar.update(1)) if bar is not None else None
    try:
        _run_engine(job, backend, items, opts, writer, result.summary, on_row)
    except EngineRunError as exc:
        result.incomplete = str(exc)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        result.summary.stop()
    if selector is not None and not result.interrupted and not result.incomplete and selector.total is not None:
        from m3cli.engines.shard import write_sidecar

        write_sidecar(job.output, selector.k, selector.n, selector.total, True)
    return result


def _resumed_options(job: BatchJob) -> BatchOptions:
    """The run's options with the ids a resumed output already holds (the output is repaired first)."""
    if not job.resume:
        return job.options
    from m3cli.output import read_done_ids, read_error_ids

    done = read_done_ids(job.output, retry_errors=job.retry_errors)
    return replace(job.options, done_ids=done, failed_ids=read_error_ids(job.output) & done)


def _open_local_backend(job: BatchJob, opts: BatchOptions):
    """The backend for ``--engine local`` (Ray loads the model in its actors only; they check the ladder too)."""
    from m3cli.backends import open_backend

    backend = open_backend(**job.model)
    if opts.auto_scale:
        from m3cli.policy import make_ladder

        make_ladder(backend.grid_side, opts.ladder, opts.tokens)  # a bad ladder is a usage error up front
    return backend


def _select_shard(job: BatchJob, items: Iterable, sink: RowSink):
    """Keep shard K's items; rows get their ``input_index``; the sidecar is written when the stream ends."""
    from m3cli.engines.shard import IndexingSink, ShardSelector, write_sidecar

    k, n = job.shard
    selector = ShardSelector(items, k, n, on_end=lambda total: write_sidecar(job.output, k, n, total, False))
    return selector, IndexingSink(sink, selector), selector


def _progress_bar(progress: bool | None):
    """A tqdm bar on stderr counting rows, or None."""
    if not (sys.stderr.isatty() if progress is None else progress):
        return None
    from tqdm import tqdm

    return tqdm(desc="m3 batch", unit="item", file=sys.stderr, dynamic_ncols=True)


def _run_engine(job: BatchJob, backend, items, opts: BatchOptions, writer: OrderedWriter, summary: Summary,
                on_row: Callable[[dict], None] | None) -> None:
    if job.engine == "ray":
        from m3cli.engines.ray import run_ray

        run_ray(job.model, items, opts, writer, summary, job.ray_address, job.actors, job.gpus_per_actor,
                on_row=on_row)
    else:
        from m3cli.engines.local import run_batch

        run_batch(backend, items, opts, writer, summary, on_row=on_row)
