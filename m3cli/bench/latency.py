"""Per-scale latency: encode, prefill and decode time of one answer at each nested scale."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from m3cli.backends.base import AnswerRequest, Backend
from m3cli.bench.scenes import BENCH_QUESTION, bench_image


@dataclass
class LatencyRow:
    scale: int
    encode_ms: float
    prefill_ms: float
    decode_ms: float
    new_tokens: float

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.prefill_ms + self.decode_ms


def latency_by_scale(
    backend: Backend,
    image_path: str | None = None,
    scales: Sequence[int] | None = None,
    repeat: int = 5,
    batch_size: int = 1,
    max_new_tokens: int = 8,
    question: str = BENCH_QUESTION,
) -> list[LatencyRow]:
    """Median per-item encode / prefill / decode times at each scale, after one warm-up."""
    image = bench_image(image_path)
    images = [image] * batch_size
    scales = list(scales) if scales else sorted(backend.scales, reverse=True)
    backend.answer([AnswerRequest(backend.encode(images[:1])[0], scales[0], question, max_new_tokens)])
    rows = []
    for scale in scales:
        enc_ms, pre_ms, dec_ms, n_new = [], [], [], []
        for _ in range(repeat):
            start = time.perf_counter()
            encoded = backend.encode(images)
            enc_ms.append((time.perf_counter() - start) * 1000 / batch_size)
            gens = backend.answer([AnswerRequest(e, scale, question, max_new_tokens) for e in encoded])
            pre_ms.append(gens[0].prefill_ms)
            dec_ms.append(gens[0].decode_ms)
            n_new.append(statistics.mean(len(g.token_ids) + 1 for g in gens))
        rows.append(LatencyRow(scale, statistics.median(enc_ms), statistics.median(pre_ms),
                               statistics.median(dec_ms), statistics.mean(n_new)))
    return rows
