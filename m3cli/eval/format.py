"""Markdown tables and the plot of ``m3 eval``: a report in, text or a PNG out."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from m3cli.eval.report import EvalReport

if TYPE_CHECKING:
    from m3cli.eval.benchmark import BenchResult
    from m3cli.eval.datarun import DataResult


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def format_accuracy(report: EvalReport, column: str = "family") -> list[str]:
    """The accuracy table: one row per family (``column`` names them), then overall."""
    lines = ["| " + column + " | " + " | ".join(f"{s}" for s in report.scales) + " |",
             "|---|" + "---:|" * len(report.scales)]
    for fam in report.families:
        lines.append(f"| {fam} | " + " | ".join(_pct(report.accuracy(s, fam)) for s in report.scales) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{_pct(report.accuracy(s))}**" for s in report.scales) + " |")
    return lines


def format_report(report: EvalReport, escalations: Sequence[dict] = (), header: str | None = None,
                  column: str = "family") -> str:
    """Accuracy per family and scale, overall, the oracle, then (with escalations) the policy table."""
    first = header or f"{report.label}, {len(report.records)} questions, {report.seconds:.0f} s"
    lines = [first, "", *format_accuracy(report, column)]
    if report.multi_crop:  # LLaVA-NeXT: the columns are tokens per crop; say what the LM received in all
        lines.append("| visual tokens (all crops) | " + " | ".join(f"{report.visual_tokens(s):.0f}"
                                                               for s in report.scales) + " |")
    o = report.oracle()
    lines += ["", f"oracle: accuracy {_pct(o['accuracy'])}%, mean tokens {o['mean_tokens']:.2f} "
              f"({o['mean_tokens_when_right']:.2f} over the questions some scale answers right)"]
    if escalations:
        lines += ["", "| policy | accuracy | mean tokens | mean rungs | ms/item |", "|---|---:|---:|---:|---:|"]
        for s in report.scales:
            lines.append(f"| fixed {s} | {_pct(report.accuracy(s))} | {s} | 1 | {report.fixed_ms(s):.1f} |")
        for e in escalations:
            lines.append(f"| auto-scale t={e['threshold']} | {_pct(e['accuracy'])} | {e['mean_tokens']:.1f} "
                         f"| {e['mean_rungs']:.2f} | {e['ms_per_item']:.1f} |")
        lines.append(f"| oracle | {_pct(o['accuracy'])} | {o['mean_tokens']:.1f} | - | - |")
    return "\n".join(lines)


def format_calibration(report: EvalReport, measures: Sequence[str]) -> str:
    """Expected calibration error of each confidence measure at each scale (lower is better)."""
    lines = ["", "calibration (ECE, 10 bins; lower is better):", "",
             "| measure | " + " | ".join(str(s) for s in report.scales) + " |",
             "|---|" + "---:|" * len(report.scales)]
    for m in measures:
        lines.append(f"| {m} | " + " | ".join(f"{report.calibration(m, s)['ece']:.3f}" for s in report.scales) + " |")
    return "\n".join(lines)


def format_tuning(rows: Sequence[dict], tuned: dict | None, ladder: Sequence[int] | None = None) -> str:
    """``m3 eval --tune``: every (measure, threshold) tried, then the pick and the ``m3 ask`` / ``m3 batch``
    flags that apply it (``ladder``: the scales evaluated, when they are not all the model's)."""
    lines = ["", "| measure | threshold | accuracy | mean tokens | mean rungs |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['measure']} | {r['threshold']} | {_pct(r['accuracy'])} | {r['mean_tokens']:.1f} "
              f"| {r['mean_rungs']:.2f} |" for r in rows]
    if tuned is None:
        return "\n".join([*lines, "", "pick: none within 1 point of full-grid accuracy"])
    flags = f"--auto-scale --threshold {tuned['threshold']:g} --measure {tuned['measure']}"
    if ladder:
        flags += f" --ladder {','.join(map(str, sorted(ladder)))}"
    return "\n".join([*lines, "", f"pick: measure {tuned['measure']}, threshold {tuned['threshold']} "
                                 f"(m3 ask / m3 batch: {flags})"])


def format_errors(errors: Sequence[dict], shown: int = 5) -> str:
    """The rows that were not evaluated: the count and the first few reasons."""
    if not errors:
        return ""
    lines = ["", f"{len(errors)} row(s) not evaluated (error rows in --samples):"]
    lines += [f"- {e['id']}: {e['error']}" for e in errors[:shown]]
    if len(errors) > shown:
        lines.append(f"- ... and {len(errors) - shown} more")
    return "\n".join(lines)


PLOT_SOFTWARE = "m3cli m3 eval"  # the PNG's Software text: how --plot tells its own earlier plot from a user's file
REPORT_KEYS = frozenset({"scales", "measure", "calibration"})  # what every --json report has
UNSCORED_REPORT_KEYS = frozenset({"scales", "model", "backend", "unscored"})  # ... of a run without gold answers


def plot(report: EvalReport, path: str | IO[bytes], escalations: Sequence[dict] = (),
         others: Sequence[tuple[str, EvalReport]] = ()) -> None:
    """Accuracy vs mean visual tokens: one line per family, overall, the auto-scale curve, the oracle, and the
    overall line of each of ``others`` (label, report) dotted (CircularEval: the single pass).

    ``path`` is a file name or a binary stream (the output guard's atomic one); the PNG says it was made here.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for fam in report.families:
        ax.plot(report.scales, [100 * report.accuracy(s, fam) for s in report.scales], marker="o", label=fam, alpha=0.8)
    ax.plot(report.scales, [100 * report.accuracy(s) for s in report.scales], marker="s", color="black",
            linewidth=2.5, label="overall (fixed scales)")
    for name, other in others:
        ax.plot(other.scales, [100 * other.accuracy(s) for s in other.scales], marker="s", color="gray",
                linewidth=2, linestyle=":", label=f"overall, {name}")
    o = report.oracle()
    ax.scatter([o["mean_tokens"]], [100 * o["accuracy"]], marker="*", s=160, color="gold", edgecolor="black",
               zorder=5, label="oracle")
    if escalations:
        pts = sorted(escalations, key=lambda e: e["mean_tokens"])
        ax.plot([e["mean_tokens"] for e in pts], [100 * e["accuracy"] for e in pts], marker="^",
                color="red", linestyle="--", label="auto-scale")
    ax.set_xscale("log")
    ax.set_xticks(report.scales)
    ax.set_xticklabels([str(s) for s in report.scales])
    ax.set_xlabel("mean visual tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(f"{report.label.replace('`', '')}, {len(report.records)} questions")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)


def is_our_plot(path: str) -> bool:
    """Whether ``path`` is a PNG ``m3 eval --plot`` wrote (its Software text), so a new plot may replace it."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:  # chunks: length, type, data, crc; text chunks come before the image data
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                data = f.read(length)
                f.read(4)
                if kind == b"tEXt" and data.split(b"\0", 1) == [b"Software", PLOT_SOFTWARE.encode()]:
                    return True
    except OSError:
        return False


def is_our_report(path: str) -> bool:
    """Whether ``path`` is a JSON report ``m3 eval --json`` wrote, so a new report may replace it."""
    try:
        if os.path.getsize(path) > 256 << 20:
            return False
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    # a report with scores, or the one of a run whose rows had no gold answers (its counts, no accuracy)
    return isinstance(data, dict) and (REPORT_KEYS <= set(data) or UNSCORED_REPORT_KEYS <= set(data))


def is_eval_data(path: str) -> bool:
    """Whether ``path`` is an eval data file as ``--export-data`` writes it, in any ``--export-format`` (its first
    line an m3 row, a LLaVA question row or the MMBench header), so a new export may replace it."""
    from m3cli.eval.synthetic import MMBENCH_COLUMNS

    try:
        with open(path, "rb") as f:
            head = f.readline(1 << 20)
        if head.rstrip(b"\r\n") == "\t".join(MMBENCH_COLUMNS).encode():
            return True
        first = json.loads(head or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and ({"id", "image", "question", "answer"} <= set(first)
                                        or {"question_id", "image", "text", "answer"} <= set(first))


def report_dict(report: EvalReport, escalations: Sequence[dict], tuned: dict | None, measure: str,
                measures: Sequence[str], **extra) -> dict:
    """Everything of ``--json``: the report's numbers, escalation rows, the tuning pick, calibration."""
    return report.to_dict() | extra | {
        "measure": measure, "escalation": list(escalations), "tuned": tuned,
        "calibration": [report.calibration(m, s) for m in measures for s in report.scales]}


def data_header(result: DataResult, counted: str | None = None) -> str:
    """The first line of a ``--data`` report: what was evaluated (``counted``: how to say the rows, default
    "N questions"), how it was scored, what it cost."""
    r = result.report
    metrics = ", ".join(f"{m} ({n})" for m, n in sorted(result.metrics.items()))
    resumed = f", {result.resumed} rows from the samples file" if result.resumed else ""
    errors = f", {len(result.errors)} not evaluated" if result.errors else ""
    cost = (f"{result.answered} answered in {result.seconds:.1f} s ({result.ms_per_row:.1f} ms/row, "
            f"{result.encodes} images encoded)" if result.answered else "nothing new to answer")
    counted = counted or f"{len(r.records)} questions"
    scored = f"scored by {metrics}" if metrics else "nothing to score"
    return f"{r.label}: {counted} on {result.images} images{errors}{resumed}; {scored}; {cost}"


def benchmark_header(bench: BenchResult) -> str:
    """The first lines of a benchmark run's report: the run's header, then what CircularEval counted."""
    g = bench.grouped
    if g is not None and g.questions:
        counted = f"{len(g.questions)} questions asked {g.asked} times"
    else:
        counted = f"{len(bench.data.report.records) + bench.data.unscored} questions"
    head = data_header(bench.data, counted)
    if bench.data.unscored:
        head += f"; {bench.data.unscored} without a gold answer (answered, not scored)"
    if g is not None:
        head += ("\nCircularEval: each question asked once per rotation of its options, right only when every "
                 "rotation is")
        if g.incomplete:
            head += f"; {len(g.incomplete)} questions left out (a rotation not evaluated)"
    return head


def format_benchmark(bench: BenchResult, column: str = "family") -> str:
    """The single-pass table and oracle (CircularEval) and the l2-category table, after the headline report."""
    lines: list[str] = []
    if bench.single is not None:
        o = bench.single.oracle()
        lines += ["", "single pass (each question once, its options as in the file):", "",
                  *format_accuracy(bench.single, column), "",
                  f"oracle: accuracy {_pct(o['accuracy'])}%, mean tokens {o['mean_tokens']:.2f}"]
    if bench.by_l2 is not None:
        title = "circular accuracy by l2-category:" if bench.single is not None else "by l2-category:"
        lines += ["", title, "", *format_accuracy(bench.by_l2, "l2-category")]
    return "\n".join(lines)
