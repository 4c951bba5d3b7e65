"""Per-scale latency: encode, prefill and decode time of one answer at each nested scale."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m3cli.backends.base import AnswerRequest, Backend, Generation
from m3cli.bench.scenes import BENCH_QUESTION, bench_image
from m3cli.bench.stats import Spread


@dataclass
class LatencyRow:
    """One scale's per-item times: p50 (median) of the timed runs, with their spread."""

    scale: int
    encode_ms: float
    prefill_ms: float
    decode_ms: float
    new_tokens: float
    prompt_tokens: int | None = None  # prompt length (text + visual tokens), where the backend tells
    prefill: Spread | None = None  # p50 / p90 of the prefill times
    total: Spread | None = None  # p50 / p90 of the total (encode + prefill + decode) times

    @property
    def total_ms(self) -> float:
        """The p50 of the per-run totals (the sum of the stage p50s when there are no runs to take it from)."""
        if self.total is not None and self.total.n:
            return self.total.p50
        return self.encode_ms + self.prefill_ms + self.decode_ms

    @property
    def lm_ms(self) -> float:
        return self.prefill_ms + self.decode_ms

    @property
    def decode_ms_per_token(self) -> float | None:
        """Decode time per forward step: the first new token comes from the prefill, so n tokens take n-1."""
        steps = self.new_tokens - 1
        return self.decode_ms / steps if steps > 0 else None


def generated_tokens(gen: Generation, max_new_tokens: int) -> int:
    """New tokens one answer generated: an answer shorter than the cap ended on EOS, which was generated too."""
    n = len(gen.token_ids)
    return n if n >= max_new_tokens else n + 1


def latency_by_scale(
    backend: Backend,
    image_path: str | None = None,
    scales: Sequence[int] | None = None,
    repeat: int = 5,
    batch_size: int = 1,
    max_new_tokens: int = 8,
    question: str = BENCH_QUESTION,
    warm_up_scale: int | None = None,
    warmup: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[LatencyRow]:
    """Per-item encode / prefill / decode times at each scale: p50 (median) and p90 of ``repeat`` timed runs.

    First one warm-up answer at ``warm_up_scale`` (default the first scale timed), then ``warmup`` untimed
    runs at every scale (each prompt length allocates its buffers once), then the timed runs, interleaved
    (scale after scale, ``repeat`` rounds) so that a change in the machine's load spreads over every scale
    instead of biasing one. ``progress(1)`` is called after each timed run.
    """
    image = bench_image(image_path)
    images = [image] * batch_size
    scales = list(scales) if scales else sorted(backend.scales, reverse=True)
    warm = scales[0] if warm_up_scale is None else warm_up_scale
    backend.answer([AnswerRequest(backend.encode(images[:1])[0], warm, question, max_new_tokens)])
    for _ in range(warmup):
        encoded = backend.encode(images)
        for scale in scales:
            backend.answer([AnswerRequest(e, scale, question, max_new_tokens) for e in encoded])
    enc_ms: dict[int, list[float]] = {s: [] for s in scales}
    pre_ms: dict[int, list[float]] = {s: [] for s in scales}
    dec_ms: dict[int, list[float]] = {s: [] for s in scales}
    n_new: dict[int, list[float]] = {s: [] for s in scales}
    last: dict[int, Generation] = {}
    for _ in range(repeat):
        for scale in scales:
            start = time.perf_counter()
            encoded = backend.encode(images)
            enc_ms[scale].append((time.perf_counter() - start) * 1000 / batch_size)
            gens = backend.answer([AnswerRequest(e, scale, question, max_new_tokens) for e in encoded])
            pre_ms[scale].append(gens[0].prefill_ms)
            dec_ms[scale].append(gens[0].decode_ms)
            n_new[scale].append(statistics.mean(generated_tokens(g, max_new_tokens) for g in gens))
            last[scale] = gens[0]
            if progress is not None:
                progress(1)
    prompt_ids = getattr(backend, "prompt_ids", None)
    rows = []
    for scale in scales:
        # LLaVA-NeXT: the LM receives every crop pooled plus newlines, not ``scale`` visual tokens
        visual = last[scale].visual_tokens if last[scale].visual_tokens is not None else scale
        prompt = len(prompt_ids(question, visual)) if callable(prompt_ids) else None
        totals = [e + p + d for e, p, d in zip(enc_ms[scale], pre_ms[scale], dec_ms[scale], strict=True)]
        rows.append(LatencyRow(scale, statistics.median(enc_ms[scale]), statistics.median(pre_ms[scale]),
                               statistics.median(dec_ms[scale]), statistics.mean(n_new[scale]), prompt,
                               Spread.of(pre_ms[scale]), Spread.of(totals)))
    return rows
