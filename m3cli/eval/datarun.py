"""``m3 eval --data``: the per-scale analysis on the user's own questions.

Every row is answered at every scale from one encoding of its image (rows about the same image file
share it: see :mod:`m3cli.eval.engine`), scored by its gold's form or a chosen metric, and written as a
sample line (:mod:`m3cli.eval.samples`). With ``resume`` the samples file is the checkpoint: rows whose
content key it already holds are not answered again. The report is computed from every sample of the data
source at the end. A row that cannot be evaluated (bad row, missing or undecodable image, a question too
long for ``max_question_chars`` or the model's context, a backend failure on it) is an error sample and is
counted, never a crash; the question check is the one ``m3 batch`` makes (:func:`m3cli.answering.core.check_question`).
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from m3cli.answering.core import DEFAULT_MAX_QUESTION_CHARS, check_question
from m3cli.backends.base import Backend
from m3cli.errors import M3Error, OutputError, UsageError, describe
from m3cli.eval import samples as sm
from m3cli.eval.data import BadRow, EvalRow, image_key
from m3cli.eval.engine import DEFAULT_CACHE, EncodeCache, EvalItem, answer_items
from m3cli.eval.report import EvalReport
from m3cli.eval.scoring import CHOICE_SUFFIX, METRICS, build_choice_prompt, metric_for
from m3cli.matryoshka.confidence import DEFAULT_MEASURE
from m3cli.matryoshka.policy import Fixed
from m3cli.media.image import ImageNotes, ImageOptions
from m3cli.output import OutputTarget, RowSchema, RowSink

Progress = Callable[[int, int], None]


class SamplesLayout(Protocol):
    """Another layout of the samples file (lmms-eval's): what its lines hold (for the output guard and
    ``--resume``), the lines of one sample, and the file read back (samples by content key)."""

    schema: RowSchema

    def lines(self, sample: dict[str, Any]) -> list[dict[str, Any]]: ...

    def read(self, path: str) -> dict[str, dict[str, Any]]: ...


class NothingEvaluated(M3Error):
    """Not one row of the data could be evaluated (the report would be empty)."""

    exit_code = 1


@dataclass
class DataOptions:
    """How ``--data`` rows are asked, scored and checkpointed."""

    scales: Sequence[int]
    metric: str | None = None  # None: by each row's gold form
    prompt_suffix: str | None = CHOICE_SUFFIX  # after a multiple-choice question's options
    question_suffix: str | None = None  # after an open question
    batch_size: int = 32
    max_new_tokens: int = 16
    measure: str = DEFAULT_MEASURE  # the confidence written in the samples
    samples: str | None = None
    resume: bool = False
    retry_errors: bool = False
    encode_cache: int = DEFAULT_CACHE
    share: bool = True  # False: encode every row's image afresh (for measuring the saving)
    overwrite: bool = False  # replace an existing samples file (else it must be empty, or resumed)
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS
    image: ImageOptions = ImageOptions()  # --upright / --alpha-background / --fast-decode (default: the recipe)
    samples_layout: SamplesLayout | None = None  # None: one m3 sample line per row


@dataclass
class DataResult:
    """The report and the counts behind it."""

    report: EvalReport
    errors: list[dict[str, Any]]  # error samples, in data order
    computed: int  # rows answered or failed in this run
    answered: int  # rows answered in this run
    resumed: int  # rows taken from the samples file
    images: int  # distinct image files among the evaluated rows
    encodes: int  # images the backend encoded in this run
    metrics: dict[str, int] = field(default_factory=dict)  # evaluated rows per metric
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)  # every row's sample, in data order
    unscored: int = 0  # rows answered without a gold answer (in no accuracy)

    @property
    def ms_per_row(self) -> float:
        """Wall time per row answered in this run (every scale, encode included)."""
        return 1000 * self.seconds / self.answered if self.answered else float("nan")

    def summary(self) -> dict[str, Any]:
        """The counts for ``--json`` (beside the report's own numbers)."""
        return {"metrics": self.metrics, "images": self.images, "encodes": self.encodes, "computed": self.computed,
                "answered": self.answered, "resumed": self.resumed, "ms_per_row": self.ms_per_row,
                "errors": {"count": len(self.errors), "rows": [{"id": e["id"], "error": e["error"]}
                                                               for e in self.errors]}}


def prompt_for(row: EvalRow, options: DataOptions) -> str:
    """The text the model sees: the choice prompt (options + suffix) or the question (+ suffix); a row whose
    layout fixes its text (``row.prompt``) gets only the suffix."""
    suffix = options.prompt_suffix if row.choices else options.question_suffix
    if row.prompt is None and row.choices:
        return build_choice_prompt(row.question, row.choices, suffix)
    text = row.question if row.prompt is None else row.prompt
    return f"{text}\n{suffix}" if suffix else text


def metric_of(row: EvalRow, options: DataOptions) -> str | None:
    """The row's metric: the chosen one, else its layout's, else the one its gold's form calls for; None for a
    row without a gold answer."""
    if row.gold_kind == "none":
        return None
    return options.metric or row.metric or metric_for(row)


def _identity(path: str) -> tuple[str, int, int] | None:
    """An image file's identity (resolved path, size, mtime): a changed file is a new image."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # loading will report it
    return image_key(path), st.st_size, st.st_mtime_ns


class _Loader:
    """Decodes rows' images with the run's options, keeping what was done to each one's pixels (by image
    identity, for the samples of every row about it) and telling ``notes`` once about what the recipe ignores."""

    def __init__(self, options: ImageOptions, notes: Callable[[str], None] | None) -> None:
        self.options = options
        self.notes = ImageNotes(notes)
        self.pixels: dict[Any, dict[str, Any]] = {}

    def load(self, src: Any, key: Any):
        from m3cli.media import open_image

        picture = open_image(src, self.options)
        fields = picture.fields()
        self.notes.see(fields, getattr(src, "name", src))
        if key is not None and any(v is not None for v in fields.values()):
            self.pixels[key] = fields
        return picture.image

    def items(self, rows: Sequence[EvalRow], options: DataOptions) -> Iterator[EvalItem]:
        for row in rows:  # lazily: each image is looked at just before its batch runs
            if row.image_source is not None:  # pixels inside the data file (MMBench TSV)
                key, opened = row.image_source.key, row.image_source.open
            else:
                key, opened = _identity(row.image), functools.partial(str, row.image)
            yield EvalItem(row.id, key, functools.partial(self._load_opened, opened, key), prompt_for(row, options),
                           row)

    def _load_opened(self, opened: Callable[[], Any], key: Any):
        return self.load(opened(), key)


def open_samples(options: DataOptions, inputs: Sequence[str] = (), folders: Sequence = (),
                 schema: RowSchema | None = None) -> OutputTarget | None:
    """The guarded samples file (:class:`m3cli.output.OutputTarget` with ``schema``: by default
    :data:`~m3cli.eval.samples.SAMPLES`, or the layout's): checked, created and locked now, before any work; None
    without ``options.samples``. ``inputs`` and ``folders`` are what the run reads (the data files; a data
    folder and the files it picks)."""
    if not options.samples:
        return None
    if schema is None:
        schema = options.samples_layout.schema if options.samples_layout is not None else sm.SAMPLES
    return OutputTarget.open(options.samples, "jsonl", resume=options.resume, overwrite=options.overwrite,
                             inputs=inputs, folders=folders, schema=schema, what="--samples")


def _prior(rows: Sequence[EvalRow | BadRow], options: DataOptions) -> dict[str, dict[str, Any]]:
    """The samples already done for this data (resume), by content key, checked to fit this run's options."""
    if not (options.resume and options.samples):
        return {}
    try:
        found = (options.samples_layout.read if options.samples_layout else sm.read_samples)(options.samples)
    except OSError as exc:
        raise OutputError(f"{options.samples}: cannot read the samples to resume ({describe(exc)})") from None
    done = {}
    for row in rows:
        sample = found.get(row.key)
        if sample is None or (sample.get("error") is not None and options.retry_errors):
            continue
        if sample.get("error") is None and isinstance(row, EvalRow):
            why = sm.mismatch(sample, prompt_for(row, options), metric_of(row, options), options.scales,
                              options.image.record())
            if why:
                raise UsageError(f"{options.samples}: row {row.id} was evaluated with {why}; resume with the "
                                 "same options or write a new --samples file")
        done[row.key] = sample
    return done


def _write(out: RowSink | None, lines: list[dict[str, Any]], layout: SamplesLayout | None = None) -> None:
    """Append ``lines`` (in ``layout``: lmms-eval's gives several per sample) in order and flush: a checkpoint,
    what is written stays done if the run stops. A full disk is :class:`~m3cli.output.OutputWriteError` (one
    line, exit code 1); what was written stays."""
    if out is None or not lines:
        return
    if layout is not None:
        lines = [line for s in lines for line in layout.lines(s)]
    for line in lines:
        out.write(line)
    out.flush()


def _refused(row: EvalRow, options: DataOptions, backend: Backend, top: int) -> str | None:
    """Why ``row`` cannot be asked (metric, question length, the model's context), or None."""
    metric = metric_of(row, options)
    if metric in ("choice", "mmbench") and row.gold_kind != "choice":
        return f"metric {metric!r} needs a row with 'choices'"
    return check_question(backend, row.question, Fixed(top), options.max_new_tokens, options.max_question_chars,
                          prompt=prompt_for(row, options))


def evaluate_data(backend: Backend, rows: Sequence[EvalRow | BadRow], options: DataOptions, label: str,
                  progress: Progress | None = None, target: OutputTarget | None = None,
                  notes: Callable[[str], None] | None = None) -> DataResult:
    """Evaluate ``rows`` (from :func:`m3cli.eval.data.read_eval_data`) at ``options.scales``.

    ``target`` is the samples file opened with :func:`open_samples` (before the model loaded); without it,
    ``options.samples`` is opened here. ``notes`` receives one-line remarks for the user (once per run: an
    image whose EXIF orientation or transparency its recipe ignores). Raises :class:`NothingEvaluated` when no
    row could be evaluated (after writing their error samples).
    """
    if options.metric is not None and options.metric not in METRICS:
        raise UsageError(f"unknown metric {options.metric!r} (choose from {', '.join(METRICS)})")
    scales = sorted(options.scales)
    own = target is None
    if own:
        target = open_samples(options)
    try:
        prior = _prior(rows, options)
        new: dict[str, dict[str, Any]] = {}
        todo: list[EvalRow] = []
        for row in rows:
            if row.key in prior:
                continue
            if isinstance(row, BadRow):
                new[row.key] = sm.error_sample(row, row.message)
            elif (why := _refused(row, options, backend, scales[-1])) is not None:
                new[row.key] = sm.error_sample(row, why, prompt_for(row, options), metric_of(row, options))
            else:
                todo.append(row)
        cache = EncodeCache(options.encode_cache)
        loader = _Loader(options.image, notes)
        layout = options.samples_layout
        start = time.perf_counter()
        out = target.sink() if target is not None else None
        try:
            _write(out, [new[r.key] for r in rows if r.key in new], layout)
            done = 0
            if progress and todo:
                progress(0, len(todo))
            for batch in answer_items(backend, loader.items(todo, options), scales, options.batch_size,
                                      options.max_new_tokens, cache, options.share):
                lines = [sm.result_sample(r.item.payload, r, metric_of(r.item.payload, options), options.measure,
                                          loader.pixels.get(r.item.key), options.image.record())
                         for r in batch]
                _write(out, lines, layout)
                new.update((s["key"], s) for s in lines)
                done += len(batch)
                if progress:
                    progress(done, len(todo))
        finally:
            if out is not None:
                out.close()
    finally:
        if own and target is not None:
            target.close()
    seconds = time.perf_counter() - start
    return _result(rows, prior, new, scales, label, seconds, cache.encodes)


def _result(rows: Sequence[EvalRow | BadRow], prior: dict, new: dict, scales: list[int], label: str,
            seconds: float, encodes: int) -> DataResult:
    """The report from every sample of ``rows`` (resumed or new), in data order; a resumed sample shows its
    row's id in this run (a default id follows the row's line)."""
    every = [s if s.get("id") == r.id else {**s, "id": r.id}
             for r in rows if (s := new.get(r.key) or prior.get(r.key)) is not None]
    answered_rows = [s for s in every if s.get("error") is None]
    good = [s for s in answered_rows if s.get("metric") is not None]  # scored: rows with a gold answer
    errors = [s for s in every if s.get("error") is not None]
    if not answered_rows:
        first = errors[0]["error"] if errors else "the data has no rows"
        raise NothingEvaluated(f"no row could be evaluated ({len(errors)} errors; the first: {first})")
    records = [sm.record(s, scales) for s in good]
    named = list(dict.fromkeys(r.family for r in records if r.family != sm.NO_FAMILY))
    families = named + [sm.NO_FAMILY] if named and any(r.family == sm.NO_FAMILY for r in records) else named
    report = EvalReport(None, scales, records, seconds, families, data=label)
    answered = sum(s.get("error") is None for s in new.values())
    return DataResult(report, errors, computed=len(new), answered=answered, resumed=len(prior),
                      images=len({image_key(s["image"]) for s in answered_rows}), encodes=encodes,
                      metrics=dict(Counter(s["metric"] for s in good)), seconds=seconds, samples=every,
                      unscored=len(answered_rows) - len(good))
