"""Choosing the visual-token scale for an answer: fixed budgets, confidence escalation, the oracle.

Pure code: a policy sees only the rungs tried so far (scale, answer, confidence) and names the
next scale or stops. Every rung pools the same encoded grid, so trying another costs one
LM prefill, never a second image encode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from m3cli.matryoshka.confidence import DEFAULT_MEASURE, MEASURES
from m3cli.matryoshka.scales import budget_to_scale, nested_scales, parse_budget

# The fallback threshold of a model without a tuned policy (the shipped model's full-ladder pick on its
# validation split, docs/confidence.md).
DEFAULT_THRESHOLD = 0.5
# What --auto-scale returns when no rung reaches the threshold: the last rung tried, or the most confident one.
ON_MISS = ("last", "best")
DEFAULT_ON_MISS = "last"


@dataclass(frozen=True)
class Rung:
    """One attempt: the scale used, the answer and its confidence."""

    scale: int
    answer: str
    confidence: float
    stopped_early: bool = False  # decoding stopped once the rung could only escalate (partial answer)

    def to_dict(self) -> dict:
        out = {"tokens": self.scale, "answer": self.answer, "confidence": round(self.confidence, 6)}
        if self.stopped_early:
            out["stopped_early"] = True
        return out


@runtime_checkable
class Policy(Protocol):
    """How a query picks its scales: ``first()`` names the first rung, ``next(tried)`` the next or None to stop.

    ``tried`` holds every rung answered so far, in order (never empty when ``next`` is called).
    """

    def first(self) -> int: ...

    def next(self, tried: Sequence[Rung]) -> int | None: ...


@dataclass(frozen=True)
class Fixed:
    """Always answer at one scale; ``measure`` names the confidence reported for the answer."""

    scale: int
    measure: str = DEFAULT_MEASURE

    def first(self) -> int:
        return self.scale

    def next(self, tried: Sequence[Rung]) -> int | None:
        return None


@dataclass(frozen=True)
class Escalate:
    """Climb the ladder from the smallest rung while confidence (under ``measure``) is below ``threshold``.

    When no rung reaches it, ``on_miss`` picks the answer: ``"last"`` the last rung tried (the largest),
    ``"best"`` the most confident rung (the larger one on a tie).
    """

    ladder: tuple[int, ...] = (1, 9, 36, 144, 576)
    threshold: float = DEFAULT_THRESHOLD
    measure: str = DEFAULT_MEASURE
    on_miss: str = DEFAULT_ON_MISS

    def __post_init__(self) -> None:
        if not self.ladder:
            raise ValueError("the escalation ladder is empty")
        if list(self.ladder) != sorted(set(self.ladder)):
            raise ValueError(f"ladder must be strictly increasing, got {list(self.ladder)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r} (one of {', '.join(MEASURES)})")
        if self.on_miss not in ON_MISS:
            raise ValueError(f"on_miss must be one of {', '.join(ON_MISS)}, got {self.on_miss!r}")

    def first(self) -> int:
        return self.ladder[0]

    def met(self, rung: Rung) -> bool:
        """Whether ``rung``'s confidence reaches the threshold."""
        return rung.confidence >= self.threshold

    def next(self, tried: Sequence[Rung]) -> int | None:
        last = tried[-1]
        if self.met(last):
            return None
        higher = [s for s in self.ladder if s > last.scale]
        return higher[0] if higher else None

    def final(self, tried: Sequence[Rung]) -> Rung:
        """The rung whose answer is returned once the climb has stopped (see ``on_miss``)."""
        last = tried[-1]
        if self.on_miss == "last" or self.met(last):
            return last
        # max() keeps the first of equals: reversed, a tie goes to the larger scale
        return max(reversed(tried), key=lambda r: r.confidence)


def final_rung(policy: Policy, tried: Sequence[Rung]) -> Rung:
    """The rung whose answer a policy returns: ``Escalate.final``, else the last rung tried."""
    pick = getattr(policy, "final", None)
    return pick(tried) if callable(pick) else tried[-1]


def threshold_met(policy: Policy, rung: Rung) -> bool | None:
    """Whether ``rung`` reached an escalating policy's threshold; None for a policy without one (fixed)."""
    met = getattr(policy, "met", None)
    return bool(met(rung)) if callable(met) else None


@dataclass(frozen=True)
class PolicySpec:
    """How questions pick their scale, as a user or a model card states it; None: not stated.

    ``tokens`` is a budget (a fixed scale, or the cap of the ladder with ``auto_scale``); ``threshold``,
    ``measure``, ``ladder`` and ``on_miss`` only matter with ``auto_scale``. :meth:`over` fills what a user
    left unstated from a model's tuned spec; :data:`FALLBACK_POLICY` is what a model without one gets.
    """

    tokens: int | None = None
    auto_scale: bool = False
    threshold: float | None = None
    measure: str | None = None
    ladder: tuple[int, ...] | None = None
    on_miss: str | None = None

    @property
    def chooses_scale(self) -> bool:
        """Whether the spec says how to pick the scale (a budget or ``auto_scale``)."""
        return self.tokens is not None or self.auto_scale

    def over(self, default: PolicySpec | None) -> PolicySpec:
        """This spec with what it leaves unstated taken from ``default``, then from :data:`FALLBACK_POLICY`.

        The scale choice is taken whole: a spec with a budget or ``auto_scale`` keeps its own (``--tokens 9``
        alone is a fixed 9 even when the model's policy escalates), one with neither takes the default's.
        The auto-scale knobs are taken one by one (``--auto-scale`` alone uses the model's threshold).
        """
        out = self
        for base in (default, FALLBACK_POLICY):
            if base is None:
                continue
            if not out.chooses_scale:
                out = replace(out, tokens=base.tokens, auto_scale=base.auto_scale,
                              ladder=out.ladder if out.ladder is not None else base.ladder)
            out = replace(
                out,
                threshold=out.threshold if out.threshold is not None else base.threshold,
                measure=out.measure if out.measure is not None else base.measure,
                on_miss=out.on_miss if out.on_miss is not None else base.on_miss,
            )
        return out

    def flags(self) -> str:
        """The command-line flags that state this spec, e.g. ``--tokens 144 --auto-scale --threshold 0.7``."""
        parts = [] if self.tokens is None else [f"--tokens {self.tokens}"]
        if self.auto_scale:
            parts.append("--auto-scale")
            if self.threshold is not None:
                parts.append(f"--threshold {self.threshold:g}")
            if self.measure is not None:
                parts.append(f"--measure {self.measure}")
            if self.ladder:
                parts.append(f"--ladder {','.join(map(str, self.ladder))}")
            if self.on_miss is not None and self.on_miss != DEFAULT_ON_MISS:
                parts.append(f"--on-miss {self.on_miss}")
        elif self.measure is not None and self.measure != DEFAULT_MEASURE:
            parts.append(f"--measure {self.measure}")
        return " ".join(parts) or "the full grid"

    def record(self) -> dict[str, Any]:
        """What a row's ``run`` records of this (full) spec: ``tokens`` (None: the full grid), and with auto-scale
        ``auto_scale``, ``threshold``, ``ladder``; ``measure`` and ``on_miss`` only when they are not the defaults
        (``sequence``, ``last``), so records made before they existed still match."""
        record: dict[str, Any] = {"tokens": self.tokens}
        if self.auto_scale:
            record.update(auto_scale=True, threshold=self.threshold,
                          ladder=list(self.ladder) if self.ladder else None)
            if self.on_miss not in (None, DEFAULT_ON_MISS):
                record["on_miss"] = self.on_miss
        if self.measure not in (None, DEFAULT_MEASURE):
            record["measure"] = self.measure
        return record

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "policy") -> PolicySpec:
        """A spec from a model card's ``policy`` mapping (keys ``tokens``, ``auto_scale``, ``threshold``,
        ``measure``, ``ladder``, ``on_miss``); ValueError naming ``where`` for anything else."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = {"tokens", "auto_scale", "threshold", "measure", "ladder", "on_miss"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            tokens = None if data.get("tokens") is None else parse_budget(data["tokens"])
            auto_scale = data.get("auto_scale", False)
            if not isinstance(auto_scale, bool):
                raise ValueError(f"auto_scale must be true or false, got {auto_scale!r}")
            threshold = data.get("threshold")
            if threshold is not None:
                if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                        or not 0.0 <= threshold <= 1.0:
                    raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
                threshold = float(threshold)
            measure = data.get("measure")
            if measure is not None and measure not in MEASURES:
                raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
            on_miss = data.get("on_miss")
            if on_miss is not None and on_miss not in ON_MISS:
                raise ValueError(f"on_miss must be one of {', '.join(ON_MISS)}, got {on_miss!r}")
            ladder = data.get("ladder")
            if ladder is not None:
                ladder = tuple(parse_budget(x) for x in ladder)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(tokens, auto_scale, threshold, measure, ladder, on_miss)


# A model without a tuned policy: its full grid, fixed (a model not trained with M3 loses accuracy below it);
# with --auto-scale, the threshold and measure below.
FALLBACK_POLICY = PolicySpec(None, False, DEFAULT_THRESHOLD, DEFAULT_MEASURE, None, DEFAULT_ON_MISS)


def make_ladder(grid: int, ladder: Sequence[int] | None = None, cap: int | None = None) -> tuple[int, ...]:
    """The escalation ladder: given rungs (each a nested scale) or all scales, capped at ``cap`` tokens.

    A cap below the first rung leaves just the capped scale, so the budget is always honoured.
    """
    valid = set(nested_scales(grid))
    rungs = sorted(set(ladder)) if ladder else sorted(valid)
    bad = [r for r in rungs if r not in valid]
    if bad:
        raise ValueError(f"ladder rungs {bad} are not nested scales of this model ({sorted(valid)})")
    if cap is not None:
        top = budget_to_scale(cap, grid).scale
        capped = [r for r in rungs if r <= top]
        rungs = capped or [top]
    return tuple(rungs)


def oracle_scale(correct_by_scale: dict[int, bool]) -> int | None:
    """The smallest scale that answered right (evaluation only: it needs the true answer)."""
    right = [s for s, ok in correct_by_scale.items() if ok]
    return min(right) if right else None
