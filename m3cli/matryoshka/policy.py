"""Choosing the visual-token scale for an answer: fixed budgets, confidence escalation, the oracle.

Pure code: a policy sees only the rungs tried so far (scale, answer, confidence) and names the
next scale or stops. Every rung pools the same encoded grid, so trying another costs one
LM prefill, never a second image encode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from m3cli.matryoshka.scales import budget_to_scale, nested_scales

# Chosen on the validation split of the shipped model (docs/confidence.md).
DEFAULT_THRESHOLD = 0.5


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
    """Always answer at one scale."""

    scale: int

    def first(self) -> int:
        return self.scale

    def next(self, tried: Sequence[Rung]) -> int | None:
        return None


@dataclass(frozen=True)
class Escalate:
    """Climb the ladder from the smallest rung while confidence is below ``threshold``."""

    ladder: tuple[int, ...] = (1, 9, 36, 144, 576)
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not self.ladder:
            raise ValueError("the escalation ladder is empty")
        if list(self.ladder) != sorted(set(self.ladder)):
            raise ValueError(f"ladder must be strictly increasing, got {list(self.ladder)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def first(self) -> int:
        return self.ladder[0]

    def next(self, tried: Sequence[Rung]) -> int | None:
        last = tried[-1]
        if last.confidence >= self.threshold:
            return None
        higher = [s for s in self.ladder if s > last.scale]
        return higher[0] if higher else None


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
