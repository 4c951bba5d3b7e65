"""What ``--auto-scale`` costs: its time per item against one fixed pass at the scale where the item ended."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m3cli.backends.base import Backend
from m3cli.bench.stats import Spread


@dataclass
class EscalationTiming:
    items: int
    auto_ms: float  # mean per item, escalation (encode once + every rung tried)
    fixed_ms: float  # mean per item, one fixed pass (encode + answer) at the scale escalation ended on
    mean_tokens: float
    mean_rungs: float
    auto: Spread | None = None  # p50 / p90 of the per-item escalation times (ms)
    fixed: Spread | None = None  # p50 / p90 of the per-item fixed-pass times (ms)

    @property
    def ratio(self) -> float:
        return self.auto_ms / self.fixed_ms


def escalation_overhead(backend: Backend, n: int = 100, threshold: float | None = None, max_new_tokens: int = 4,
                        split: str = "test", ladder: Sequence[int] | None = None,
                        progress: Callable[[int], None] | None = None, measure: str | None = None
                        ) -> EscalationTiming:
    """Per item: --auto-scale time against one fixed pass at the scale where that item ended (one run).

    Both sides include the image encode; items are timed one at a time so each has its own time. ``ladder``
    (default every scale) is the rungs tried, smallest first; ``threshold`` and ``measure`` default to the
    fallback policy's (the CLI passes the model's tuned ones).
    """
    from m3cli.answering.core import ask_images
    from m3cli.data.scenes import iter_questions, render
    from m3cli.errors import UsageError
    from m3cli.matryoshka.confidence import DEFAULT_MEASURE
    from m3cli.matryoshka.policy import DEFAULT_THRESHOLD, Escalate, Fixed, make_ladder

    try:
        policy = Escalate(make_ladder(backend.grid_side, ladder), DEFAULT_THRESHOLD if threshold is None else threshold,
                          measure or DEFAULT_MEASURE)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    pairs = list(iter_questions(split, n))
    warm = render(pairs[0][0].scene)
    for each in (Fixed(1), policy):  # warm-up: both paths once, untimed
        ask_images(backend, [warm], [pairs[0][1].question], [each], max_new_tokens)
    auto, fixed, tokens, rungs = [], [], [], []
    for sample, qa in pairs:
        image = render(sample.scene)
        t0 = time.perf_counter()
        res = ask_images(backend, [image], [qa.question], [policy], max_new_tokens)[0]
        auto.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ask_images(backend, [image], [qa.question], [Fixed(res.tokens)], max_new_tokens)
        fixed.append(time.perf_counter() - t0)
        tokens.append(res.tokens)
        rungs.append(len(res.scales_tried))
        if progress is not None:
            progress(1)
    return EscalationTiming(len(pairs), 1000 * statistics.mean(auto), 1000 * statistics.mean(fixed),
                            statistics.mean(tokens), statistics.mean(rungs),
                            Spread.of([1000 * x for x in auto]), Spread.of([1000 * x for x in fixed]))
