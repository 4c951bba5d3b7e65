"""``m3 eval``: accuracy per question family and scale on the synthetic-scene splits, the oracle,
confidence calibration, and confidence escalation replayed from the per-scale answers.

Every question is answered at every requested scale from ONE encoding of its image. Because
decoding is greedy and each rung pools the same grid, an escalation policy's outcome equals a
replay of those per-scale answers; its time is the encode plus the rungs it would have tried.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from m3cli.backends.base import AnswerRequest, Backend
from m3cli.confidence import MEASURES, expected_calibration_error
from m3cli.data import scenes
from m3cli.policy import Escalate, Rung, oracle_scale


def normalise(text: str) -> str:
    """Lower-case first word, punctuation stripped: how one-word answers are compared."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


@dataclass
class Record:
    """One question answered at every scale."""

    family: str
    question: str
    truth: str
    answers: dict[int, str]
    logprobs: dict[int, list[float]]
    ms: dict[int, float]  # prefill + decode per scale
    encode_ms: float

    def correct(self, scale: int) -> bool:
        return normalise(self.answers[scale]) == self.truth


@dataclass
class EvalReport:
    split: str
    scales: list[int]
    records: list[Record]
    seconds: float
    families: list[str] = field(default_factory=list)

    def accuracy(self, scale: int, family: str | None = None) -> float:
        rows = [r for r in self.records if family is None or r.family == family]
        return sum(r.correct(scale) for r in rows) / len(rows) if rows else float("nan")

    def oracle(self) -> dict[str, float]:
        """Paper-style oracle: the fewest tokens that answer each question right.

        Questions no scale answers right count at the largest scale (and as wrong).
        """
        top = max(self.scales)
        picks = [oracle_scale({s: r.correct(s) for s in self.scales}) for r in self.records]
        right = [p for p in picks if p is not None]
        return {
            "accuracy": len(right) / len(picks) if picks else float("nan"),
            "mean_tokens": sum(p if p is not None else top for p in picks) / len(picks) if picks else float("nan"),
            "mean_tokens_when_right": sum(right) / len(right) if right else float("nan"),
        }

    def escalation(self, threshold: float, measure: str, ladder: Sequence[int] | None = None) -> dict[str, float]:
        """Replay ``Escalate(ladder, threshold)`` over the recorded per-scale answers."""
        policy = Escalate(tuple(sorted(ladder or self.scales)), threshold)
        fn = MEASURES[measure]
        right = tokens = rungs = ms = 0.0
        for r in self.records:
            tried: list[Rung] = []
            scale: int | None = policy.first()
            while scale is not None:
                tried.append(Rung(scale, r.answers[scale], fn(r.logprobs[scale])))
                scale = policy.next(tried)
            final = tried[-1].scale
            right += r.correct(final)
            tokens += final
            rungs += len(tried)
            ms += r.encode_ms + sum(r.ms[t.scale] for t in tried)
        n = len(self.records)
        return {"threshold": threshold, "accuracy": right / n, "mean_tokens": tokens / n,
                "mean_rungs": rungs / n, "ms_per_item": ms / n}

    def calibration(self, measure: str, scale: int) -> dict[str, float]:
        conf = [MEASURES[measure](r.logprobs[scale]) for r in self.records]
        ok = [r.correct(scale) for r in self.records]
        return {"measure": measure, "tokens": scale, "ece": expected_calibration_error(conf, ok),
                "mean_confidence": sum(conf) / len(conf), "accuracy": sum(ok) / len(ok)}

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "n": len(self.records),
            "scales": self.scales,
            "seconds": round(self.seconds, 1),
            "accuracy": {str(s): self.accuracy(s) for s in self.scales},
            "by_family": {f: {str(s): self.accuracy(s, f) for s in self.scales} for f in self.families},
            "oracle": self.oracle(),
        }


def evaluate(
    backend: Backend,
    split: str = "test",
    n: int = 600,
    scales: Sequence[int] | None = None,
    families: Sequence[str] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress=None,
) -> EvalReport:
    """Answer ``n`` family-balanced questions of ``split`` at every scale, encoding each image once."""
    scales = sorted(scales or backend.scales)
    pairs = list(scenes.iter_questions(split, n, families))
    start = time.perf_counter()
    records: list[Record] = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        encoded = backend.encode([scenes.render(sample.scene) for sample, _ in chunk])
        per_scale = {}
        for scale in scales:
            requests = [AnswerRequest(enc, scale, qa.question, max_new_tokens)
                        for enc, (_, qa) in zip(encoded, chunk, strict=True)]
            per_scale[scale] = backend.answer(requests)
        for i, (_, qa) in enumerate(chunk):
            gens = {s: per_scale[s][i] for s in scales}
            records.append(Record(
                family=qa.family, question=qa.question, truth=qa.answer,
                answers={s: gens[s].text for s in scales},
                logprobs={s: gens[s].logprobs for s in scales},
                ms={s: gens[s].prefill_ms + gens[s].decode_ms for s in scales},
                encode_ms=encoded[i].encode_ms,
            ))
        if progress:
            progress(len(records), len(pairs))
    fams = [f for f in scenes.FAMILIES if any(r.family == f for r in records)]
    return EvalReport(split, scales, records, time.perf_counter() - start, fams)


def format_report(report: EvalReport, escalations: Sequence[dict] = ()) -> str:
    """Markdown tables: accuracy per family and scale, overall, oracle, escalation rows."""
    head = "| family | " + " | ".join(f"{s}" for s in report.scales) + " |"
    lines = [f"split `{report.split}`, {len(report.records)} questions, {report.seconds:.0f} s", "",
             head, "|---|" + "---:|" * len(report.scales)]
    for fam in report.families:
        lines.append(f"| {fam} | " + " | ".join(f"{100 * report.accuracy(s, fam):.1f}" for s in report.scales) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{100 * report.accuracy(s):.1f}**" for s in report.scales) + " |")
    o = report.oracle()
    lines += ["", f"oracle: accuracy {100 * o['accuracy']:.1f}%, mean tokens {o['mean_tokens']:.2f} "
              f"({o['mean_tokens_when_right']:.2f} over the questions some scale answers right)"]
    if escalations:
        lines += ["", "| policy | accuracy | mean tokens | mean rungs | ms/item |", "|---|---:|---:|---:|---:|"]
        for s in report.scales:
            ms = sum(r.encode_ms + r.ms[s] for r in report.records) / len(report.records)
            lines.append(f"| fixed {s} | {100 * report.accuracy(s):.1f} | {s} | 1 | {ms:.1f} |")
        for e in escalations:
            lines.append(f"| auto-scale t={e['threshold']} | {100 * e['accuracy']:.1f} | {e['mean_tokens']:.1f} "
                         f"| {e['mean_rungs']:.2f} | {e['ms_per_item']:.1f} |")
        lines.append(f"| oracle | {100 * o['accuracy']:.1f} | {o['mean_tokens']:.1f} | - | - |")
    return "\n".join(lines)


def plot(report: EvalReport, path: str, escalations: Sequence[dict] = ()) -> None:
    """Accuracy vs visual tokens, one line per family (+ overall, oracle and auto-scale points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for fam in report.families:
        ax.plot(report.scales, [100 * report.accuracy(s, fam) for s in report.scales], marker="o", label=fam, alpha=0.8)
    ax.plot(report.scales, [100 * report.accuracy(s) for s in report.scales], marker="s", color="black",
            linewidth=2.5, label="overall")
    o = report.oracle()
    ax.scatter([o["mean_tokens"]], [100 * o["accuracy"]], marker="*", s=160, color="gold", edgecolor="black",
               zorder=5, label="oracle")
    if escalations:
        ax.plot([e["mean_tokens"] for e in escalations], [100 * e["accuracy"] for e in escalations], marker="^",
                color="red", linestyle="--", label="auto-scale")
    ax.set_xscale("log")
    ax.set_xticks(report.scales)
    ax.set_xticklabels([str(s) for s in report.scales])
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(f"{report.split} split, {len(report.records)} questions")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tune_escalation(report: EvalReport, measures: Sequence[str], thresholds: Sequence[float],
                    tolerance: float = 0.01) -> tuple[list[dict], dict | None]:
    """Every (measure, threshold) escalation row, and the pick: the fewest mean tokens among rows within
    ``tolerance`` of fixed full-grid accuracy (ties: higher accuracy); None if no row gets that close."""
    rows = [report.escalation(t, m) | {"measure": m} for m in measures for t in thresholds]
    target = report.accuracy(max(report.scales)) - tolerance
    good = [r for r in rows if r["accuracy"] >= target - 1e-12]
    best = min(good, key=lambda r: (r["mean_tokens"], -r["accuracy"])) if good else None
    return rows, best
