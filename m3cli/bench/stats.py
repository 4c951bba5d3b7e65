"""What every ``m3 bench`` table states beside its figures: their spread, and the machine they were measured on.

A figure is the median (p50) of repeated timings; p90 says how far the slow runs strayed. A figure whose p90
is more than :data:`SPREAD_LIMIT` above its p50 was measured on a busy or throttling machine and is flagged:
compare it with nothing until a rerun on a quiet machine agrees.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass

SPREAD_LIMIT = 0.25  # p90 / p50 - 1 above which a figure is too noisy to compare
FLAG = "WIDE"  # marks such a figure in a table


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, linearly interpolated (numpy's default); nan if empty."""
    values = sorted(samples)
    if not values:
        return math.nan
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Spread:
    """p50 and p90 of repeated timings (any unit), and how many there were."""

    n: int
    p50: float
    p90: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        return cls(len(samples), percentile(samples, 50), percentile(samples, 90))

    @property
    def ratio(self) -> float | None:
        """p90 / p50 - 1 (None with fewer than two timings, or a zero median)."""
        if self.n < 2 or not self.p50 > 0:
            return None
        return self.p90 / self.p50 - 1

    @property
    def wide(self) -> bool:
        """Too noisy to compare: at least three timings and p90 more than SPREAD_LIMIT above p50."""
        return self.n >= 3 and self.ratio is not None and self.ratio > SPREAD_LIMIT


def spread_cell(*spreads: Spread) -> str:
    """The widest relative spread of ``spreads`` as ``+12%`` (flagged when too wide), ``-`` with one timing."""
    ratios = [s.ratio for s in spreads if s.ratio is not None]
    if not ratios:
        return "-"
    worst = max(ratios)
    return f"+{100 * worst:.0f}%" + (f" {FLAG}" if any(s.wide for s in spreads) else "")


def spread_note(flagged: bool, what: str) -> str:
    """The line under a table: how to read p50 / p90, and a warning when a figure was flagged."""
    note = (f"{what}; spread = p90 / p50 - 1 (the widest of the row), {FLAG} above "
            f"+{100 * SPREAD_LIMIT:.0f}%.")
    if flagged:
        note += (f" Rows marked {FLAG} were measured while the machine was busy or throttling: do not compare "
                 "them; rerun on a quiet machine.")
    return note


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (the kernel's ``model name``), else what the platform module says."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_words(threads: str, device: str) -> str:
    """``CPU <model>, <usable>/<all> cores, <threads>, device <device>, load <1-min average>``."""
    load = load_average()
    cores = f"{usable_cores()}/{os.cpu_count() or '?'} cores"
    words = f"CPU {cpu_model()}, {cores}, {threads}, device {device}"
    return words + (f", load {load:.2f} at start" if load is not None else "")
