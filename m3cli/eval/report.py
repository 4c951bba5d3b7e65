"""The evaluation report: every question answered at every scale, and what follows from that.

Accuracy per scale (overall and per family), the oracle, the escalation replay and calibration are all
computed from the recorded per-scale answers. Because decoding is greedy and each rung pools the same
grid, an escalation policy's outcome equals a replay of those answers; its time is the encode plus the
rungs it would have tried.

A record may stand for one question asked several ways (MMBench's CircularEval: once per rotation of its
options, :func:`combine`): it is right at a scale only when every way is, the oracle is the fewest tokens at
which every way is right, the escalation replay runs the policy on each way (each is a query of its own)
and counts the question right only when every way ends right, and calibration looks at each way.

A record's per-scale ``scores`` are the metric's values in [0, 1] (VQA accuracy can be fractional; the
scenes' ``describe`` family scores the fraction of objects a description names); records without them are
the synthetic scenes' one-word answers, right when the first word matches. Accuracy is the mean score; a
record is *correct* when its score reaches its ``pass_mark`` (1 unless its family sets a lower bar).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from m3cli.matryoshka.confidence import MEASURES, expected_calibration_error
from m3cli.matryoshka.policy import Escalate, Rung


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
    encode_ms: float  # this question's share of its image's encode
    scores: dict[int, float] | None = None  # None: first word == truth
    id: str = ""
    pass_mark: float = 1.0  # the score that counts as correct (describe: m3cli.data.describe.PASS_MARK)
    visual: dict[int, int] | None = None  # visual tokens the LM received per scale (LLaVA-NeXT); None: the scale
    capped: dict[int, bool] | None = None  # the answer ran to its token cap (did not end by itself) per scale
    parts: tuple[Record, ...] = ()  # the ways this question was asked (CircularEval); () for one plain question

    def score(self, scale: int) -> float:
        """The answer's score at ``scale``, in [0, 1]."""
        if self.scores is not None:
            return self.scores[scale]
        return float(normalise(self.answers[scale]) == self.truth)

    def correct(self, scale: int) -> bool:
        """The score at ``scale`` reaches the record's pass mark (full credit unless its family says less)."""
        return self.score(scale) >= self.pass_mark


def combine(parts: Sequence[Record], id: str, family: str) -> Record:
    """One question asked as each of ``parts`` (its rotations): right at a scale only when every part is (its
    score: the lowest part score); its answers and logprobs are the first part's, its times the parts' mean
    (each part is one query)."""
    first, n = parts[0], len(parts)
    scales = list(first.answers)
    return Record(
        family=family, question=first.question, truth=first.truth, answers=dict(first.answers),
        logprobs=dict(first.logprobs), ms={s: sum(p.ms[s] for p in parts) / n for s in scales},
        encode_ms=sum(p.encode_ms for p in parts) / n, scores={s: min(p.score(s) for p in parts) for s in scales},
        id=id, pass_mark=min(p.pass_mark for p in parts), visual=first.visual, parts=tuple(parts))


def soft_calibration_error(confidences: Sequence[float], scores: Sequence[float], bins: int = 10) -> float:
    """ECE with fractional correctness (a bin's accuracy is its mean score); equals
    :func:`m3cli.matryoshka.confidence.expected_calibration_error` when every score is 0 or 1."""
    if all(s in (0.0, 1.0) for s in scores):
        return expected_calibration_error(confidences, [s == 1.0 for s in scores], bins)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if members:
            conf = sum(confidences[i] for i in members) / len(members)
            acc = sum(scores[i] for i in members) / len(members)
            total += len(members) / len(confidences) * abs(conf - acc)
    return total


@dataclass
class EvalReport:
    """Records answered at ``scales``; ``split`` names the synthetic split, ``data`` a data source instead."""

    split: str | None
    scales: list[int]
    records: list[Record]
    seconds: float
    families: list[str] = field(default_factory=list)
    data: str | None = None
    questions: str | None = None  # the scenes asked otherwise than by their templates: "held-out phrasings"

    @property
    def label(self) -> str:
        """What was evaluated, for headers and titles."""
        if self.data is not None:
            return f"data `{self.data}`"
        return f"split `{self.split}`" + (f" ({self.questions})" if self.questions else "")

    def capped(self, scale: int, family: str | None = None) -> int:
        """Answers (of one family if given) that ran to their token cap at ``scale`` instead of ending."""
        return sum(bool(r.capped and r.capped[scale]) for r in self.records if family is None or r.family == family)

    def accuracy(self, scale: int, family: str | None = None) -> float:
        """Mean score at ``scale`` (over one family's records if given)."""
        rows = [r for r in self.records if family is None or r.family == family]
        return sum(r.score(scale) for r in rows) / len(rows) if rows else float("nan")

    def passed(self, scale: int, family: str | None = None) -> float:
        """Share of records (of one family if given) that are correct at ``scale``."""
        rows = [r for r in self.records if family is None or r.family == family]
        return sum(r.correct(scale) for r in rows) / len(rows) if rows else float("nan")

    def visual_tokens(self, scale: int) -> float:
        """Mean visual tokens the LM received at per-crop ``scale`` (LLaVA-NeXT: all crops and newlines)."""
        counts = [(r.visual or {}).get(scale, scale) for r in self.records]
        return sum(counts) / len(counts) if counts else float("nan")

    @property
    def multi_crop(self) -> bool:
        """Whether any record's LM received more visual tokens than its per-crop scale (LLaVA-NeXT)."""
        return any(r.visual and any(v != s for s, v in r.visual.items()) for r in self.records)

    def oracle_pick(self, record: Record) -> int | None:
        """The fewest tokens reaching the record's best score; None when no scale scores above 0."""
        best = max(record.score(s) for s in self.scales)
        return min(s for s in self.scales if record.score(s) == best) if best > 0 else None

    def oracle(self) -> dict[str, float]:
        """Paper-style oracle: the fewest tokens that answer each question right (for fractional scores:
        reach its best score). Questions no scale answers right count at the largest scale (and as wrong)."""
        top = max(self.scales)
        picks = [self.oracle_pick(r) for r in self.records]
        right = [p for p in picks if p is not None]
        n = len(picks)
        score = sum(r.score(p) for r, p in zip(self.records, picks, strict=True) if p is not None)
        return {
            "accuracy": score / n if n else float("nan"),
            "mean_tokens": sum(p if p is not None else top for p in picks) / n if n else float("nan"),
            "mean_tokens_when_right": sum(right) / len(right) if right else float("nan"),
        }

    def escalation(self, threshold: float, measure: str, ladder: Sequence[int] | None = None) -> dict[str, float]:
        """Replay ``Escalate(ladder, threshold)`` over the recorded per-scale answers.

        A question asked several ways (``parts``) replays each way; it is right only when every way ends
        right, and its tokens, rungs and time are the mean over its ways (per query)."""
        policy = Escalate(tuple(sorted(ladder or self.scales)), threshold)
        fn = MEASURES[measure]

        def replay(r: Record) -> tuple[float, float, float, float]:
            tried: list[Rung] = []
            scale: int | None = policy.first()
            while scale is not None:
                tried.append(Rung(scale, r.answers[scale], fn(r.logprobs[scale])))
                scale = policy.next(tried)
            return (r.score(tried[-1].scale), tried[-1].scale, len(tried),
                    r.encode_ms + sum(r.ms[t.scale] for t in tried))

        right = tokens = rungs = ms = 0.0
        for r in self.records:
            ways = [replay(p) for p in r.parts] if r.parts else [replay(r)]
            right += min(w[0] for w in ways)
            tokens += sum(w[1] for w in ways) / len(ways)
            rungs += sum(w[2] for w in ways) / len(ways)
            ms += sum(w[3] for w in ways) / len(ways)
        n = len(self.records) or math.nan
        return {"threshold": threshold, "accuracy": right / n, "mean_tokens": tokens / n,
                "mean_rungs": rungs / n, "ms_per_item": ms / n}

    def fixed_ms(self, scale: int) -> float:
        """Mean time per question of a fixed pass at ``scale``: its encode share, prefill and decode."""
        n = len(self.records) or math.nan
        return sum(r.encode_ms + r.ms[scale] for r in self.records) / n

    def calibration(self, measure: str, scale: int) -> dict[str, float]:
        """ECE, mean confidence and accuracy of ``measure`` at ``scale`` (over every query: each way a question
        was asked counts)."""
        queries = [p for r in self.records for p in (r.parts or (r,))]
        conf = [MEASURES[measure](r.logprobs[scale]) for r in queries]
        scores = [r.score(scale) for r in queries]
        n = len(conf) or math.nan
        return {"measure": measure, "tokens": scale, "ece": soft_calibration_error(conf, scores),
                "mean_confidence": sum(conf) / n, "accuracy": sum(scores) / n}

    def to_dict(self) -> dict:
        """The headline numbers (the CLI adds escalation, tuning and calibration)."""
        out = {
            "split": self.split,
            "n": len(self.records),
            "scales": self.scales,
            "seconds": round(self.seconds, 1),
            "accuracy": {str(s): self.accuracy(s) for s in self.scales},
            "by_family": {f: {str(s): self.accuracy(s, f) for s in self.scales} for f in self.families},
            "oracle": self.oracle(),
        }
        barred = [f for f in self.families if any(r.family == f and r.pass_mark < 1.0 for r in self.records)]
        if barred:  # families whose mean score is not their share of correct answers
            out["passed"] = {f: {str(s): self.passed(s, f) for s in self.scales} for f in barred}
        if self.multi_crop:  # LLaVA-NeXT: the total the LM received at each per-crop scale
            out["visual_tokens"] = {str(s): self.visual_tokens(s) for s in self.scales}
        if self.data is not None:
            out["data"] = self.data
        if self.questions is not None:
            out["questions"] = self.questions
        if any(r.capped is not None for r in self.records):
            out["capped"] = {f: {str(s): self.capped(s, f) for s in self.scales} for f in self.families}
        return out


def tune_escalation(report: EvalReport, measures: Sequence[str], thresholds: Sequence[float],
                    tolerance: float = 0.01) -> tuple[list[dict], dict | None]:
    """Every (measure, threshold) escalation row, and the pick: the fewest mean tokens among rows within
    ``tolerance`` of fixed full-grid accuracy (ties: higher accuracy); None if no row gets that close."""
    rows = [report.escalation(t, m) | {"measure": m} for m in measures for t in thresholds]
    target = report.accuracy(max(report.scales)) - tolerance
    good = [r for r in rows if r["accuracy"] >= target - 1e-12]
    best = min(good, key=lambda r: (r["mean_tokens"], -r["accuracy"])) if good else None
    return rows, best
