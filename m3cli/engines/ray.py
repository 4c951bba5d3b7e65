"""``m3 batch --engine ray``: the same rows as the single-process runner, computed on a Ray cluster.

The driver enumerates the inputs (cheap descriptors) and numbers them; a Ray Data pipeline decodes them
in CPU tasks (videos expand into frames there) and answers them in a fixed pool of actors, each of which
loads the model once and runs :func:`m3cli.engines.units.answer_units` on every batch it is given. Results come
back to the driver in input order (``preserve_order``) and are written one by one through the caller's
:class:`~m3cli.output.OrderedWriter`, flushed per row, exactly as ``run_batch`` writes them, so
``--resume``, ``--shard`` and ``m3 merge`` work unchanged.

This module is the driver; :mod:`~m3cli.engines.ray_cluster` joins the cluster and
:mod:`~m3cli.engines.ray_workers` holds the code that runs there. Ray is imported lazily, only in these
modules (``import ray`` is the absolute, top-level package: this file's name does not shadow it); it is the
optional ``ray`` extra (``pip install 'm3cli[ray]'``).

Row numbering: input ``i`` yields rows ``(i, 0), (i, 1), ...`` (a video yields one per sampled frame, then
possibly an error row for the video; with several questions, one per question of each picture, numbered
``j * questions + q`` by the actor that answers them all from one encode). Because the pipeline preserves
order, the driver walks the inputs in order and turns those pairs into the writer's consecutive sequence
numbers; inputs already done in a resumed run (images, bad inputs) are skipped on the driver and never
shipped to the cluster.

Fault tolerance: answering actors are restarted when their process dies (``max_restarts=-1``) and the
batch they were running is retried on the replacement (``max_task_retries``); decode tasks are retried
too. A run that still fails part-way raises :class:`EngineRunError` naming the inputs that have no row
yet; the rows written so far are flushed, so ``--resume`` completes the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from m3cli import logs
from m3cli.engines import EngineError, EngineRunError
from m3cli.engines.native_stderr import filter_native_stderr
from m3cli.engines.ray_cluster import (
    DECODE_CPUS,
    cluster_sizes,
    connect,
    import_ray,
    preflight,
    quiet_ray_logs,
    ray_error_line,
)
from m3cli.engines.ray_workers import Answerer, decode_task, dumps_meta, encode_item, setup_message
from m3cli.engines.units import BatchOptions, question_count
from m3cli.matryoshka.scales import budget_note
from m3cli.media import BadInput, Item
from m3cli.media.inputs import question_ids, split_question_id
from m3cli.output import OrderedWriter, Summary

log = logging.getLogger(__name__)

__all__ = ["EngineError", "EngineRunError", "connect", "import_ray", "preflight", "run_ray"]

TASK_RETRIES = 3  # retries per answering batch, on top of actor restarts
_SHOW = 5


# ------------------------------------------------------------------------------------------- plan


@dataclass
class _Input:
    """One top-level input on the driver: its number, its id, and what the cluster needs (None: skipped)."""

    index: int
    id: str
    descriptor: str | None  # JSON for the decode task; None when the driver skips it (done in a resumed run)
    skip_ids: list[str] = field(default_factory=list)  # the rows a skipped input stands for (one per question)


def _done_by_input(done_ids: set[str]) -> dict[str, list[str]]:
    """Done row ids under every top-level id they may belong to: the id itself, without its question number
    (``ID#q2``), and without its frame number (``ID#3``, ``ID#3#q2``). The decode task checks exact ids."""
    by_input: dict[str, list[str]] = {}
    for ident in done_ids:
        base, _ = split_question_id(ident)
        head, sep, tail = base.rpartition("#")
        for owner in {ident, base, head if sep and head and tail.isdigit() else base}:
            by_input.setdefault(owner, []).append(ident)
    return by_input


def _plan(inputs: Iterable[Item | BadInput], opts: BatchOptions) -> list[_Input]:
    """Number the inputs; mark the ones a resumed run skips outright (every row done; as the local engine
    does, never a video, whose frames are only known once it is decoded)."""
    by_input = _done_by_input(opts.done_ids)
    n_questions = len(opts.run_questions)
    plan = []
    for index, item in enumerate(inputs):
        video = isinstance(item, Item) and item.kind == "video"
        row_ids = question_ids(item.id, question_count(item, n_questions))
        if not video and all(r in opts.done_ids for r in row_ids):
            plan.append(_Input(index, item.id, None, row_ids))
            continue
        desc: dict[str, Any] = {"item": encode_item(item), "done": sorted(set(by_input.get(item.id, ())))}
        plan.append(_Input(index, item.id, dumps_meta(desc)))
    return plan


def run_ray(
    model_kw: dict[str, Any],
    inputs: Iterable[Item | BadInput],
    opts: BatchOptions,
    writer: OrderedWriter,
    summary: Summary,
    ray_address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    on_row: Callable[[dict], None] | None = None,
    notes: Callable[[str], None] | None = None,
) -> None:
    """Answer every input on a Ray cluster and write its row in input order; see the module docstring.

    ``notes`` receives one-line remarks (a ``--tokens`` budget rounded to a scale: told once, when the first
    actor's answers say what grid the model has).

    Raises :class:`EngineError` before any work (Ray missing, cluster unreachable, model unusable),
    :class:`EngineRunError` when the pipeline fails part-way (rows written so far stay), and
    KeyboardInterrupt on Ctrl-C after the rows already received are written. Shuts Ray down when it
    started the connection; an already initialised Ray (``ray.is_initialized()``) is used and left running.
    """
    if actors < 1:
        raise EngineError(f"--actors must be >= 1, got {actors}")
    if gpus_per_actor < 0:
        raise EngineError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    ray = import_ray()
    with _guard_stdout():
        with filter_native_stderr(enabled=logs.verbosity() < 1):  # Ray's C++ retry lines while it connects
            owned = connect(ray, ray_address)
        try:
            quiet_ray_logs()
            actor_cpus, threads = cluster_sizes(ray, actors, gpus_per_actor)
            plan = _plan(inputs, opts)
            # Ray's C++ core writes warnings straight to fd 2 (e.g. about actor restarts); -v shows them
            with filter_native_stderr(enabled=logs.verbosity() < 1):
                _drive(ray, plan, model_kw, opts, writer, summary, actors, gpus_per_actor, actor_cpus, threads,
                       on_row, notes)
        finally:
            if owned:
                ray.shutdown()


@contextlib.contextmanager
def _guard_stdout():
    """Keep stdout for rows: Ray's driver prints cluster messages ("(raylet) Task ... failed, retrying",
    worker tracebacks) to ``sys.stdout`` whatever ``log_to_driver`` says. While the engine runs they go to
    stderr with -v and nowhere otherwise; a sink opened on stdout before the call keeps the real stream."""
    if logs.verbosity() >= 1:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _drive(ray, plan, model_kw, opts, writer, summary, actors, gpus_per_actor, actor_cpus, threads, on_row,
           notes=None):
    from ray.data import DataContext

    seq = 0

    def skip(ident: str) -> None:
        nonlocal seq
        writer.skip(seq)
        summary.skip(failed=ident in opts.failed_ids)
        seq += 1

    def emit(row: dict) -> None:
        nonlocal seq
        writer.put(seq, row)
        summary.add(row)
        seq += 1
        if on_row is not None:
            on_row(row)

    work = [{"i": p.index, "d": p.descriptor} for p in plan if p.descriptor is not None]
    if not work:  # nothing for the cluster (e.g. resuming a finished run): no actor, no model load
        for p in plan:
            skip(p.id)
        return

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.wait_for_min_actors_s)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = 600  # never wait forever for actors a cluster cannot place
    records: Iterator[dict] | None = None
    merger = _Merger(plan, skip, emit)
    try:
        blocks = max(1, min(len(work), math.ceil(len(work) / opts.batch_size), 10_000))
        ds = ray.data.from_items(work, override_num_blocks=blocks)
        # Decode tasks keep Ray's default retries (a task whose worker dies is run again).
        ds = ds.flat_map(decode_task, fn_kwargs={"sampling": opts.sampling, "n_questions": len(opts.run_questions),
                                                 "image_options": opts.image},
                         num_cpus=DECODE_CPUS)
        cluster_opts = replace(opts, done_ids=set(), failed_ids=set())  # the cluster never needs them
        ds = _answer_stage(ds, dict(
            fn_constructor_kwargs={"model_kw": dict(model_kw), "opts": cluster_opts, "threads": threads},
            batch_size=opts.batch_size,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=gpus_per_actor or 0,
            num_cpus=actor_cpus,
        ))
        records = iter(ds.iter_rows())
        merger.run(_noting(records, opts.tokens, notes))
    except _PipelineFailed as failed:
        raise _run_error(failed.__cause__ or failed, plan, merger.position, writer.written) from None
    finally:  # KeyboardInterrupt passes through here: rows received so far are written and flushed
        close = getattr(records, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort while shutting down
                log.debug("closing the Ray iterator failed", exc_info=True)
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.wait_for_min_actors_s) = saved


def _noting(records: Iterator[dict], tokens: int | None, notes: Callable[[str], None] | None) -> Iterator[dict]:
    """``records``, telling ``notes`` once about a rounded ``--tokens`` budget (the actors know the grid)."""
    told = notes is None or tokens is None
    for record in records:
        if not told and record.get("grid") is not None:
            told = True
            note = budget_note(tokens, int(record["grid"]))
            if note is not None:
                notes(note)
        yield record


class _PipelineFailed(Exception):
    """Raised (from the Ray error) when the pipeline itself fails, as opposed to the writer or a callback."""


class _Merger:
    """Walks the plan in input order, turning the pipeline's ``(i, j)`` records into writer calls.

    ``position`` is the plan index of the input being written, so on failure everything from there on
    (that input included: a video may be half written) is what a ``--resume`` still has to answer.
    """

    def __init__(self, plan: list[_Input], skip: Callable[[str], None], emit: Callable[[dict], None]):
        self.plan = plan
        self.skip = skip
        self.emit = emit
        self.position = 0

    def run(self, records: Iterator[dict]) -> None:
        pending = _next(records)
        while self.position < len(self.plan):
            current = self.plan[self.position]
            if current.descriptor is None:
                for ident in current.skip_ids or [current.id]:
                    self.skip(ident)
            else:
                last_j = -1
                while pending is not None and int(pending["i"]) == current.index:
                    if int(pending["j"]) <= last_j:
                        raise _PipelineFailed(f"rows of input {current.id!r} came back out of order")
                    last_j = int(pending["j"])
                    if pending["skip"]:
                        self.skip(str(pending["id"]))
                    else:
                        self.emit(json.loads(pending["row"]))
                    pending = _next(records)
                if pending is not None and int(pending["i"]) < current.index:
                    raise _PipelineFailed(f"rows came back out of order (input {int(pending['i'])})")
            self.position += 1
        if pending is not None:
            raise _PipelineFailed(f"a row for unknown input {int(pending['i'])} came back")


def _next(records: Iterator[dict]) -> dict | None:
    """The next record, or None at the end; a failure inside Ray becomes :class:`_PipelineFailed`."""
    try:
        return next(records, None)
    except Exception as exc:  # noqa: BLE001 - anything the cluster raises ends the run the same way
        raise _PipelineFailed(str(exc)) from exc


def _run_error(exc: BaseException, plan: list[_Input], position: int, written: int) -> Exception:
    """The error for a pipeline that failed at ``plan[position]``: EngineError when the actors never
    loaded the model (nothing written), else EngineRunError naming the inputs without complete output."""
    message = setup_message(exc)
    if message is not None and written == 0:
        return EngineError(f"the Ray actors could not load the model: {message}")
    missing = [p.id for p in plan[position:] if p.descriptor is not None]
    shown = ", ".join(missing[:_SHOW]) + (", …" if len(missing) > _SHOW else "")
    return EngineRunError(
        f"the Ray pipeline failed after {written} row(s): {message or ray_error_line(exc)}; "
        f"{len(missing)} input(s) have no complete output ({shown}); rerun with --resume",
        missing,
    )


def _answer_stage(ds, kwargs: dict[str, Any]):
    """``map_batches`` over the answering actors, with explicit fault tolerance where Ray still takes it.

    A dead actor process is replaced (``max_restarts=-1``) and the batches it held run again on the
    replacement, at most ``TASK_RETRIES`` times each, so one poisonous batch cannot loop forever. Ray Data
    deprecates passing these as extra keyword arguments (removal announced for 2.64); where they are
    refused, its own defaults apply (infinite restarts and retries for map actors).
    """
    import warnings

    fault = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            return ds.map_batches(Answerer, **kwargs, **fault)
    except TypeError:
        log.debug("this Ray refuses max_restarts/max_task_retries in map_batches; using its defaults")
        return ds.map_batches(Answerer, **kwargs)
