"""Answer questions about images under a scale policy: encode once, pool per rung, decode.

The core loop shared by ``m3 ask``, ``m3 batch`` and ``m3 eval``; it knows no CLI and prints nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from m3cli.backends.base import AnswerRequest, Backend, Encoded
from m3cli.confidence import DEFAULT_MEASURE, confidence
from m3cli.policy import DEFAULT_THRESHOLD, Escalate, Fixed, Policy, Rung, make_ladder
from m3cli.scales import budget_to_scale


@dataclass
class Result:
    """What one question cost and returned: the final rung plus every rung tried."""

    answer: str
    confidence: float
    tokens: int
    scales_tried: list[Rung]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "confidence": round(self.confidence, 6),
            "tokens": self.tokens,
            "scales_tried": [r.to_dict() for r in self.scales_tried],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class Query:
    """One question about one encoded image, under a policy (Fixed or Escalate)."""

    encoded: Encoded
    question: str
    policy: Policy = field(default_factory=lambda: Fixed(576))
    max_new_tokens: int = 16


def make_policy(
    grid: int,
    tokens: int | None = None,
    auto_scale: bool = False,
    threshold: float | None = None,
    ladder: Sequence[int] | None = None,
) -> Policy:
    """The scale policy for a question: a fixed scale (the budget rounded down, or the full grid), or with
    ``auto_scale`` escalation over ``ladder`` (default: every scale) capped at the budget."""
    if auto_scale:
        return Escalate(make_ladder(grid, ladder, tokens), DEFAULT_THRESHOLD if threshold is None else threshold)
    return Fixed(budget_to_scale(tokens, grid).scale if tokens is not None else grid * grid)


def answer_queries(
    backend: Backend, queries: Sequence[Query], measure: str = DEFAULT_MEASURE
) -> list[Result]:
    """Run every query's policy to the end, batching all queries that sit on a rung together.

    Escalation only re-runs the LM on the same encoded grid, pooled to the next scale.
    """
    rungs: list[list[Rung]] = [[] for _ in queries]
    timings = [{"encode_ms": q.encoded.encode_ms, "prefill_ms": 0.0, "decode_ms": 0.0} for q in queries]
    next_scale: dict[int, int] = {i: q.policy.first() for i, q in enumerate(queries)}
    while next_scale:
        order = sorted(next_scale)
        requests = [
            AnswerRequest(queries[i].encoded, next_scale[i], queries[i].question, queries[i].max_new_tokens)
            for i in order
        ]
        generations = backend.answer(requests)
        following: dict[int, int] = {}
        for i, gen in zip(order, generations, strict=True):
            rungs[i].append(Rung(next_scale[i], gen.text, confidence(gen.logprobs, measure)))
            timings[i]["prefill_ms"] += gen.prefill_ms
            timings[i]["decode_ms"] += gen.decode_ms
            nxt = queries[i].policy.next(rungs[i])
            if nxt is not None:
                following[i] = nxt
        next_scale = following
    results = []
    for tried, t in zip(rungs, timings, strict=True):
        t["total_ms"] = t["encode_ms"] + t["prefill_ms"] + t["decode_ms"]
        final = tried[-1]
        results.append(Result(final.answer, final.confidence, final.scale, tried, t))
    return results


def ask_images(
    backend: Backend,
    images: Sequence,
    questions: Sequence[str],
    policies: Sequence[Policy],
    max_new_tokens: int = 16,
    measure: str = DEFAULT_MEASURE,
) -> list[Result]:
    """Encode each image once, then answer its question under its policy (one batch)."""
    start = time.perf_counter()
    encoded = backend.encode(images)
    queries = [
        Query(enc, q, pol, max_new_tokens) for enc, q, pol in zip(encoded, questions, policies, strict=True)
    ]
    results = answer_queries(backend, queries, measure)
    wall = (time.perf_counter() - start) * 1000 / max(len(results), 1)
    for r in results:
        r.timings["wall_ms"] = wall
    return results
