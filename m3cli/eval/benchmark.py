"""A ``--data`` run with the benchmarks' conventions around it: CircularEval, the l2-category view, LLaVA answer
files and lmms-eval's samples layout.

:func:`evaluate_benchmark` is :func:`m3cli.eval.datarun.evaluate_data` with, before it, the rows expanded into
their rotations (``circular``) and the samples file's layout chosen (``samples_format``); after it, the
reports the benchmark reads (the circular one and the single pass, by category; by ``l2-category`` when the
rows have one) and the answer files (``answers_out``). Everything is computed from the run's samples, so a
resumed run reports and writes what one uninterrupted run would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from m3cli.backends.base import Backend
from m3cli.errors import UsageError
from m3cli.eval import circular as circ
from m3cli.eval import samples as sm
from m3cli.eval.data import BadRow, EvalRow
from m3cli.eval.datarun import DataOptions, DataResult, Progress, evaluate_data
from m3cli.eval.llava_files import check_answers, write_answers
from m3cli.eval.lmms_eval import LMMS_EVAL_SAMPLES, LmmsEvalSamples
from m3cli.eval.report import EvalReport, Record
from m3cli.output import FolderInput, OutputTarget, RowSchema

log = logging.getLogger(__name__)

SAMPLES_FORMATS: tuple[str, ...] = ("m3", "lmms-eval")


@dataclass
class BenchOptions:
    """The benchmark conventions of a run (all off by default: a plain ``--data`` run)."""

    circular: bool = False
    answers_out: str | None = None  # LLaVA answer files, one per scale (m3cli.eval.llava_files.answers_path)
    samples_format: str = "m3"
    overwrite: bool = False  # --overwrite: existing answer files are replaced (else only ours, with --resume)
    inputs: Sequence[str] = ()  # what the run reads, which no answer file may be (the output guard)
    folders: Sequence[FolderInput] = ()


def samples_schema(samples_format: str) -> RowSchema:
    """What the lines of a samples file in ``samples_format`` hold, for the output guard and ``--resume``."""
    if samples_format not in SAMPLES_FORMATS:
        raise UsageError(f"unknown samples format {samples_format!r} (choose from {', '.join(SAMPLES_FORMATS)})")
    return LMMS_EVAL_SAMPLES if samples_format == "lmms-eval" else sm.SAMPLES


@dataclass
class BenchResult:
    """The run, its headline report and the benchmark's other views."""

    data: DataResult
    report: EvalReport  # the headline: one record per question (CircularEval: per question, all its rounds)
    single: EvalReport | None = None  # CircularEval: round 0 of each question (the options as in the file)
    by_l2: EvalReport | None = None  # the headline regrouped by l2-category (MMBench)
    grouped: circ.Circular | None = None
    answers: list[str] = field(default_factory=list)  # the answer files written

    @property
    def column(self) -> str:
        """What the report's groups are called: MMBench's ``category``, else ``family``."""
        mmbench = any((s.get("meta") or {}).get("format") == "mmbench" for s in self.data.samples)
        return "category" if mmbench else "family"

    def summary(self) -> dict[str, Any]:
        """The counts and views for ``--json`` (beside the run's own summary)."""
        out: dict[str, Any] = {"unscored": self.data.unscored}
        if self.grouped is not None and self.single is not None:
            out["circular"] = {"questions": len(self.grouped.questions), "asked": self.grouped.asked,
                               "incomplete": self.grouped.incomplete}
            out["single_pass"] = self.single.to_dict()
        if self.by_l2 is not None:
            out["by_l2_category"] = self.by_l2.to_dict()["by_family"]
        if self.answers:
            out["answers_out"] = self.answers
        return out


def _families(records: Sequence[Record]) -> list[str]:
    named = list(dict.fromkeys(r.family for r in records if r.family != sm.NO_FAMILY))
    return named + [sm.NO_FAMILY] if named and any(r.family == sm.NO_FAMILY for r in records) else named


def _by_l2(report: EvalReport, samples: Sequence[dict[str, Any]]) -> EvalReport | None:
    l2 = {s["id"]: (s.get("meta") or {}).get("l2-category") for s in samples}
    if not any(l2.values()):
        return None
    records = [replace(r, family=l2.get(r.id) or sm.NO_FAMILY) for r in report.records]
    return EvalReport(None, report.scales, records, report.seconds, _families(records), data=report.data)


def evaluate_benchmark(backend: Backend, rows: Sequence[EvalRow | BadRow], options: DataOptions,
                       bench: BenchOptions, label: str, progress: Progress | None = None,
                       notes: Callable[[str], None] | None = None, target: OutputTarget | None = None) -> BenchResult:
    """Evaluate ``rows`` as :func:`~m3cli.eval.datarun.evaluate_data` does, with ``bench``'s conventions;
    ``target``: the samples file already opened by :func:`~m3cli.eval.datarun.open_samples` with
    :func:`samples_schema` (None: opened there)."""
    if bench.circular:
        rows = circ.expand(rows)
    elif circ.has_file_copies(rows):
        log.warning("%s holds MMBench's CircularEval copies (index >= 1000000): without --circular each is "
                    "scored as a question of its own", label)
    if bench.samples_format == "lmms-eval":
        task = os.path.splitext(os.path.basename(label))[0] or "data"
        options = replace(options, samples_layout=LmmsEvalSamples([r.id for r in rows], task,
                                                                  options.max_new_tokens))
    answer_files = []
    if bench.answers_out:  # checked again now that the scales are known, before any row is answered
        answer_files = check_answers(bench.answers_out, sorted(options.scales), overwrite=bench.overwrite,
                                     resume=options.resume, inputs=bench.inputs, folders=bench.folders)
    result = evaluate_data(backend, rows, options, label, progress, target=target, notes=notes)
    report, single, grouped = result.report, None, None
    if bench.circular:
        grouped = circ.group_samples(result.samples, report.scales)
        report = EvalReport(None, report.scales, grouped.questions, result.seconds,
                            _families(grouped.questions), data=label)
        single = EvalReport(None, report.scales, grouped.single, result.seconds, _families(grouped.single),
                            data=label)
    answers = []
    if bench.answers_out:
        answers = write_answers(answer_files, result.samples, report.scales, backend.model_id)
    return BenchResult(result, report, single, _by_l2(report, result.samples), grouped, answers)
