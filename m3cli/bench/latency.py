"""Per-scale latency: encode, prefill and decode time of one answer at each nested scale."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from m3cli.backends.base import AnswerRequest, Backend, Generation
from m3cli.bench.scenes import BENCH_QUESTION, bench_image


@dataclass
class LatencyRow:
    scale: int
    encode_ms: float
    prefill_ms: float
    decode_ms: float
    new_tokens: float
    prompt_tokens: int | None = None  # prompt length (text + visual tokens), where the backend tells

    @property
    def total_ms(self) -> float:
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
) -> list[LatencyRow]:
    """Median per-item encode / prefill / decode times at each scale, after one warm-up answer
    (at ``warm_up_scale``, default the first scale timed)."""
    image = bench_image(image_path)
    images = [image] * batch_size
    scales = list(scales) if scales else sorted(backend.scales, reverse=True)
    warm = scales[0] if warm_up_scale is None else warm_up_scale
    backend.answer([AnswerRequest(backend.encode(images[:1])[0], warm, question, max_new_tokens)])
    prompt_ids = getattr(backend, "prompt_ids", None)
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
            n_new.append(statistics.mean(generated_tokens(g, max_new_tokens) for g in gens))
        # LLaVA-NeXT: the LM receives every crop pooled plus newlines, not ``scale`` visual tokens
        visual = gens[0].visual_tokens if gens[0].visual_tokens is not None else scale
        prompt = len(prompt_ids(question, visual)) if callable(prompt_ids) else None
        rows.append(LatencyRow(scale, statistics.median(enc_ms), statistics.median(pre_ms),
                               statistics.median(dec_ms), statistics.mean(n_new), prompt))
    return rows
