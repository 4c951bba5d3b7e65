"""Answer confidence from the generated tokens' log-probabilities.

Candidates are kept side by side so ``m3 eval`` can measure their calibration; the default is
the one chosen on the validation split (see docs/confidence.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def sequence_prob(logprobs: Sequence[float]) -> float:
    """Probability of the whole greedy answer: exp of the summed token log-probs."""
    return math.exp(sum(logprobs)) if logprobs else 0.0


def min_token_prob(logprobs: Sequence[float]) -> float:
    """Probability of the least certain token."""
    return math.exp(min(logprobs)) if logprobs else 0.0


def first_token_prob(logprobs: Sequence[float]) -> float:
    """Probability of the first token, which usually decides a one-word answer."""
    return math.exp(logprobs[0]) if logprobs else 0.0


def mean_token_prob(logprobs: Sequence[float]) -> float:
    """Geometric mean of token probabilities (length-normalised sequence probability)."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


MEASURES: dict[str, Callable[[Sequence[float]], float]] = {
    "sequence": sequence_prob,
    "min": min_token_prob,
    "first": first_token_prob,
    "mean": mean_token_prob,
}
DEFAULT_MEASURE = "sequence"
# Measures whose value for a prefix of an answer bounds the full answer's from above (a product of
# probabilities <= 1, a minimum, the first token's): the exact early exit may stop decoding on them.
MONOTONE_MEASURES = frozenset({"sequence", "min", "first"})


def confidence(logprobs: Sequence[float], measure: str = DEFAULT_MEASURE) -> float:
    """Confidence in [0, 1] of an answer under the named measure."""
    try:
        fn = MEASURES[measure]
    except KeyError:
        raise ValueError(f"unknown confidence measure {measure!r} (one of {', '.join(MEASURES)})") from None
    return fn(logprobs)


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: the bin-weighted gap between mean confidence and accuracy (equal-width bins)."""
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    if not confidences:
        return 0.0
    total = 0.0
    for lo_idx in range(bins):
        lo, hi = lo_idx / bins, (lo_idx + 1) / bins
        members = [
            i for i, c in enumerate(confidences) if (lo <= c < hi) or (lo_idx == bins - 1 and c == 1.0)
        ]
        if members:
            conf = sum(confidences[i] for i in members) / len(members)
            acc = sum(1 for i in members if correct[i]) / len(members)
            total += len(members) / len(confidences) * abs(conf - acc)
    return total
