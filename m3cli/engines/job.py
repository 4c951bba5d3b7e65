"""One ``m3 batch`` run from start to exit code: resume, shard selection, sinks, progress, engine choice.

:func:`run_job` is what the CLI calls once it has parsed the flags; it knows no click and prints nothing
but the optional progress bar on stderr (notes go to a callback). Problems that concern the whole run are
found before the model loads and are one-line :class:`~m3cli.errors.UsageError` /
:class:`~m3cli.errors.M3Error` exceptions (exit code 2): options that cannot go together, an output that
cannot be written or is locked by another run, a ``--resume`` file that is not ours or was made with
another question, model or budget. The outcome of a run that started is a :class:`JobResult`, whose
``exit_code`` is 0 (all answered), 1 (error rows, an output that stopped accepting rows, or an engine that
stopped part-way) or 130 (interrupted). Whatever stops a run, the output holds its rows in input order with
no gap, so ``--resume`` completes it in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from m3cli.engines import EngineRunError
from m3cli.engines.units import BatchOptions
from m3cli.errors import UsageError
from m3cli.fileio import escape_surrogates, input_problem
from m3cli.media.image import ImageNotes
from m3cli.output import BATCH_ROWS, OrderedWriter, OutputTarget, OutputWriteError, RowSink, Summary, is_stdout

ENGINES = ("local", "ray")
INPUT_FORMATS = ("media", "openai")
COUNT_THREAD = "m3-count"  # lists the inputs a second time for the progress total; it logs nothing


class _NotFromCounter(logging.Filter):
    """Drops the log records of the counting thread (the real walk reports skipped files, once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != COUNT_THREAD


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
    force: bool = False  # --resume even if the rows were made with another question, model or budget
    overwrite: bool = False  # replace an existing -o file (else it must be empty, or resumed)
    shard: tuple[int, int] | None = None  # (K, N)
    engine: str = "local"
    ray_address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    progress: bool | None = None  # None: a bar on a terminal, else periodic lines (m3cli.output.progress)
    input_format: str = "media"  # media: files, folders, videos, stdin; openai: OpenAI Batch request files

    def check(self) -> None:
        """Raise :class:`UsageError` for options that cannot go together."""
        opts = self.options
        if opts.question is not None and not opts.question.strip():
            raise UsageError("-q/--question is empty (leave it out to ask the default question)")
        if any(not q.strip() for q in opts.questions):
            raise UsageError("a -q/--question is empty (leave it out to ask the default question)")
        if opts.fps is not None and opts.every is not None:
            raise UsageError("--fps and --every cannot be combined")
        _check_video_mode(opts)
        _check_openai(self)
        to_jsonl_file = not is_stdout(self.output) and self.fmt in ("jsonl", "openai")
        if self.resume and not to_jsonl_file:
            raise UsageError("--resume needs -o FILE in jsonl (or openai) format")
        if self.shard is not None and not to_jsonl_file:
            raise UsageError("--shard needs -o FILE in jsonl format (not stdout: the shard's sidecar goes beside it)")
        if self.retry_errors and not self.resume:
            raise UsageError("--retry-errors goes with --resume")
        if self.force and not self.resume:
            raise UsageError("--force goes with --resume")
        if self.overwrite and self.resume:
            raise UsageError("--overwrite replaces the -o file and --resume completes it: give one of them")
        if self.overwrite and is_stdout(self.output):
            raise UsageError("--overwrite goes with -o FILE")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine != "ray" and (self.ray_address is not None or self.actors != 1 or self.gpus_per_actor):
            raise UsageError("--ray-address, --actors and --gpus-per-actor go with --engine ray")


def _check_openai(job: BatchJob) -> None:
    """What ``--input-format openai`` and ``--format openai`` need: the requests bring their own questions and
    budgets; the Ray engine and shards read media inputs only."""
    from m3cli.answering.defaults import DEFAULT_QUESTION

    if job.input_format not in INPUT_FORMATS:
        raise UsageError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {job.input_format!r}")
    if job.input_format != "openai":
        if job.fmt == "openai":
            raise UsageError("--format openai writes OpenAI Batch output lines: it goes with --input-format openai")
        return
    if job.options.questions or (job.options.question or DEFAULT_QUESTION) != DEFAULT_QUESTION:
        raise UsageError("-q does not go with --input-format openai: each request brings its question")
    if job.engine != "local" or job.shard is not None:
        raise UsageError("--input-format openai runs on --engine local, without --shard")
    for path in job.inputs:
        problem = None if path == "-" else input_problem(path, empty_ok=True)
        if problem is not None:  # by type, before anything opens it: a FIFO or device is refused, never read
            raise UsageError(f"OpenAI Batch file {escape_surrogates(path)}: {problem}")


def _check_video_mode(opts: BatchOptions) -> None:
    from m3cli.engines.units import VIDEO_MODES

    if opts.video_mode not in VIDEO_MODES:
        raise UsageError(f"--video-mode must be one of {', '.join(VIDEO_MODES)}, got {opts.video_mode!r}")
    if opts.video_mode != "collage":
        return
    picked = [flag for flag, value in (("--fps", opts.fps), ("--every", opts.every),
                                       ("--max-frames", opts.max_frames)) if value is not None]
    if picked:
        raise UsageError(f"{', '.join(picked)} pick frames for --video-mode frames; a collage takes "
                         "--collage-frames K frames spread uniformly")
    if opts.collage_frames < 1:
        raise UsageError(f"--collage-frames must be >= 1, got {opts.collage_frames}")
    if opts.collage_layout is not None:
        cols, rows = opts.collage_layout
        if cols < 1 or rows < 1 or cols * rows < opts.collage_frames:
            raise UsageError(f"--collage-layout {cols}x{rows} has {cols * rows} cells for --collage-frames "
                             f"{opts.collage_frames}")


@dataclass
class JobResult:
    """How a run that started ended."""

    summary: Summary
    interrupted: bool = False
    incomplete: str | None = None  # the engine or the output stopped part-way: why
    resumable: bool = True  # the output is a JSONL file that --resume can complete

    @property
    def exit_code(self) -> int:
        if self.incomplete:
            return 1
        if self.interrupted:
            return 130
        return 1 if self.summary.failed or self.summary.skipped_failed else 0

    def report(self) -> list[str]:
        """The closing lines for stderr (the CLI prefixes them with ``m3 batch: ``)."""
        hint = "; rerun with --resume" if self.resumable else ""
        if self.incomplete:
            return [f"error: {self.incomplete}", f"{self.summary.line()} (incomplete{hint})"]
        return [self.summary.line() + (f" (interrupted{hint})" if self.interrupted else "")]


def run_record(job: BatchJob) -> dict[str, Any]:
    """What the run's rows are made with, written in each row as ``run`` and compared by ``--resume``: the
    model (resolved: a path made absolute), the question of items without their own (the list, when there
    are several), the budget, the answer length, the image options given (``--upright``,
    ``--alpha-background``, ``--fast-decode``: other pixels) and a collage's frame count and layout. Device, dtype,
    batch size and frame sampling are left out: they may change between a run and its resumption without
    changing what is asked."""
    from m3cli.models.registry import resolve_model

    opts = job.options
    model = resolve_model(job.model.get("model"))  # RegistryError (exit 2) now rather than after the lock
    if os.path.exists(model):
        model = os.path.realpath(model)
    questions = opts.run_questions
    question: str | list[str] = questions if len(questions) > 1 else opts.run_question
    record: dict[str, Any] = {"model": model, "question": question, **opts.run_policy.record()}
    record["max_new_tokens"] = opts.max_new_tokens
    if opts.max_visual_tokens is not None:  # absent otherwise, so earlier runs' records still match
        record["max_visual_tokens"] = opts.max_visual_tokens
    record.update(opts.image.record())  # --upright / --alpha-background / --fast-decode: only those given
    if job.input_format == "openai":  # absent otherwise, so earlier runs' records still match
        record["input_format"] = "openai"
        if job.fmt == "openai":
            record["format"] = "openai"
    if opts.video_mode == "collage":  # a video's row is another picture: a frames run's rows are not its rows
        layout = opts.collage_layout
        record.update(video_mode="collage", collage_frames=opts.collage_frames,
                      collage_layout=f"{layout[0]}x{layout[1]}" if layout else None)
    return record


def run_job(job: BatchJob, notes: Callable[[str], None] | None = None) -> JobResult:
    """Run ``job``: every input answered once, rows in input order, the output resumable if it stops.

    ``notes`` receives one-line remarks for the user (e.g. a ``--tokens`` budget rounded to a scale).
    """
    from m3cli.media import iter_inputs

    job.check()
    if job.engine == "ray":
        from m3cli.engines.ray import preflight

        preflight(job.model, job.ray_address)  # EngineError (exit 2) before the output file is touched
    run = run_record(job)
    openai_out = job.fmt == "openai"
    schema = BATCH_ROWS
    if openai_out:  # OpenAI Batch output lines, each wrapping its row: the same guard, the row read out of them
        from m3cli.engines.openai_batch import OPENAI_BATCH_ROWS as schema
    target = OutputTarget.open(job.output, "jsonl" if openai_out else job.fmt, resume=job.resume, run=run,
                               force=job.force, retry_errors=job.retry_errors, overwrite=job.overwrite,
                               inputs=[p for p in job.inputs if p != "-"], folders=_input_folders(job),
                               schema=schema)
    try:
        opts = replace(job.options, run=run, done_ids=target.state.done_ids, failed_ids=target.state.failed_ids)
        backend = _open_local_backend(job, opts, notes) if job.engine == "local" else None
        sink: RowSink = target.sink()
    except BaseException:
        target.close(abandon=True)
        raise
    try:
        if job.input_format == "openai":
            sink, units = _openai_units(job, backend, opts, sink)
            return _run_started(job, backend, opts, sink, [], notes, units)
        return _run_started(job, backend, opts, sink, iter_inputs(list(job.inputs)), notes)
    finally:
        target.close()


def _input_folders(job: BatchJob) -> list[tuple[str, Callable[[str], bool]]]:
    """The input folders and what their walk reads (media files): an -o file there would be read next time.
    OpenAI Batch inputs are files, never walked."""
    from m3cli.media import media_kind

    if job.input_format != "media":
        return []
    return [(p, lambda path: media_kind(path) is not None) for p in job.inputs if p != "-" and os.path.isdir(p)]


def _openai_units(job: BatchJob, backend, opts: BatchOptions, sink: RowSink):
    """The units of OpenAI Batch files, and the sink (written as Batch output lines with ``--format openai``)."""
    from m3cli.answering.chat_request import ChatDefaults
    from m3cli.engines.openai_batch import OpenAIBatchInput, OpenAIBatchSink

    defaults = ChatDefaults(tokens=opts.tokens, auto_scale=opts.auto_scale, threshold=opts.threshold,
                            ladder=opts.ladder, measure=opts.measure, on_miss=opts.on_miss,
                            model_policy=opts.default_policy, max_visual_tokens=opts.max_visual_tokens,
                            max_new_tokens=opts.max_new_tokens, image=opts.image)
    source = OpenAIBatchInput(job.inputs, backend.grid_side, defaults, backend.model_id, job.model.get("model"))
    if job.fmt == "openai":
        sink = OpenAIBatchSink(sink, source)
    return sink, source.units(opts)


def _run_started(job: BatchJob, backend, opts: BatchOptions, sink: RowSink, items: Iterable,
                 notes: Callable[[str], None] | None = None, units=None) -> JobResult:
    selector = None
    if job.shard is not None:
        items, sink, selector = _select_shard(job, items, sink, opts.run)
    writer = OrderedWriter(sink)
    result = JobResult(Summary(), resumable=not is_stdout(job.output) and job.fmt in ("jsonl", "openai"))
    bar = _progress(job, opts)
    pixel_notes = ImageNotes(notes)  # once per run: an EXIF orientation or a transparency the recipe ignores

    def on_row(row: dict) -> None:
        pixel_notes.see(row, row.get("source"))
        if bar is not None:
            bar.update(1)

    try:
        _run_engine(job, backend, items, opts, writer, result.summary, on_row, notes, units)
    except (EngineRunError, OutputWriteError) as exc:  # rows written so far are kept
        result.incomplete = str(exc)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        try:
            # Rows held back behind one not yet answered are dropped, never written past the gap: the file
            # stays an in-order prefix that --resume extends in order.
            writer.close(past_gaps=False)
        except OutputWriteError as exc:
            result.incomplete = result.incomplete or str(exc)
        if bar is not None:
            bar.close()
        result.summary.stop()
    if selector is not None and not result.interrupted and not result.incomplete and selector.total is not None:
        from m3cli.engines.shard import write_sidecar

        try:
            write_sidecar(job.output, selector.k, selector.n, selector.total, True, run=opts.run)
        except OutputWriteError as exc:
            result.incomplete = str(exc)
    return result


def _open_local_backend(job: BatchJob, opts: BatchOptions, notes: Callable[[str], None] | None):
    """The backend for ``--engine local`` (Ray loads the model in its actors only; they check the ladder too)."""
    from m3cli.backends import open_backend
    from m3cli.matryoshka.scales import budget_note

    backend = open_backend(**job.model)
    policy = opts.run_policy
    if policy.auto_scale:
        from m3cli.matryoshka.policy import make_ladder

        make_ladder(backend.grid_side, policy.ladder, policy.tokens)  # a bad ladder is a usage error up front
    note = budget_note(opts.tokens, backend.grid_side)
    if note is not None and notes is not None:
        notes(note)
    return backend


def _select_shard(job: BatchJob, items: Iterable, sink: RowSink, run: dict[str, Any] | None = None):
    """Keep shard K's items; rows get their ``input_index``; the sidecar is written when the stream ends."""
    from m3cli.engines.shard import IndexingSink, ShardSelector, write_sidecar

    k, n = job.shard
    # the hash is the top-level item's: every question of an image (every frame of a video) is in one shard
    selector = ShardSelector(items, k, n, on_end=lambda total: write_sidecar(job.output, k, n, total, False, run=run))
    rows = _QuestionRows(selector) if len(job.options.run_questions) > 1 else selector
    return selector, IndexingSink(sink, rows), selector


class _QuestionRows:
    """``index_of`` for a several-question run: a row ``ID#q<k>`` belongs to the input of the row ``ID``."""

    def __init__(self, selector) -> None:
        self.selector = selector

    def index_of(self, row: dict[str, Any]) -> int:
        from m3cli.media.inputs import split_question_id

        try:
            return self.selector.index_of(row)
        except KeyError:
            base, number = split_question_id(str(row.get("id")))
            if number is None:
                raise
            return self.selector.index_of({**row, "id": base})


def _progress(job: BatchJob, opts: BatchOptions):
    """The run's progress on stderr (rows answered), or None with ``--no-progress``. Its total (the rows still
    to answer) is counted in a background thread when it can be known: files and folders, not stdin."""
    from m3cli.output.progress import Progress, progress_mode

    mode = progress_mode(job.progress)
    if mode == "off":
        return None
    bar = Progress("m3 batch", unit="item", mode=mode)  # one per row, as the closing summary counts them
    if job.shard is None and "-" not in job.inputs:  # a shard answers an unknown share of the rows
        for name in ("m3cli.media.files", "m3cli.media.inputs"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _NotFromCounter) for f in logger.filters):
                logger.addFilter(_NotFromCounter())
        count = count_requests if job.input_format == "openai" else count_rows
        bar.count_in_background(lambda: count(job.inputs, opts), COUNT_THREAD)
    return bar


def count_rows(inputs: Iterable[str], opts: BatchOptions) -> int | None:
    """The rows a run over ``inputs`` (paths; not ``-``) will answer: one per image and question, minus those
    ``opts.done_ids`` holds (``--resume``). None when it cannot be known before decoding (a video sampled into
    frames) or the inputs cannot be listed."""
    from m3cli.engines.units import question_count
    from m3cli.media import iter_inputs
    from m3cli.media.inputs import question_ids

    n_questions = len(opts.run_questions)
    total = 0
    try:
        for item in iter_inputs(list(inputs)):
            if getattr(item, "kind", None) == "video" and opts.video_mode != "collage":
                return None
            n = question_count(item, n_questions)
            total += sum(row_id not in opts.done_ids for row_id in question_ids(item.id, n))
    except (OSError, ValueError):
        return None
    return total


def count_requests(inputs: Iterable[str], opts: BatchOptions) -> int | None:
    """:func:`count_rows` for OpenAI Batch files (``--input-format openai``): one row per request line."""
    from m3cli.engines.openai_batch import count_requests as count
    from m3cli.errors import M3Error

    try:
        return count(list(inputs), opts.done_ids)
    except (M3Error, OSError, ValueError):
        return None


def _run_engine(job: BatchJob, backend, items, opts: BatchOptions, writer: OrderedWriter, summary: Summary,
                on_row: Callable[[dict], None] | None, notes: Callable[[str], None] | None = None,
                units=None) -> None:
    if job.engine == "ray":
        from m3cli.engines.ray import run_ray

        run_ray(job.model, items, opts, writer, summary, job.ray_address, job.actors, job.gpus_per_actor,
                on_row=on_row, notes=notes)
    else:
        from m3cli.engines.local import run_batch

        run_batch(backend, items, opts, writer, summary, on_row=on_row, units=units)
