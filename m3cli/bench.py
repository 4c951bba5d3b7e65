"""Speed measurements behind ``m3 bench`` (pure measurement; the CLI formats and prints)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from m3cli.backends.base import AnswerRequest, Backend

BENCH_QUESTION = "what colour is the background?"


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


def bench_image(path: str | None = None):
    """The image to time: a file, or the first test-split scene (always available)."""
    if path:
        from m3cli.media import load_image

        return load_image(path)
    from m3cli.data.scenes import render, sample

    return render(sample("test", 0).scene)


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


def machine_line(backend: Backend) -> str:
    """A one-line description of where the numbers were measured."""
    import torch

    device = getattr(backend, "device", "cpu")
    if str(device).startswith("cuda"):
        where = torch.cuda.get_device_name(0)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return f"{backend.name} backend on {device} ({where}), dtype {getattr(backend, 'dtype', '?')}"


def format_latency_table(rows: Sequence[LatencyRow], backend: Backend) -> str:
    """Markdown table of per-scale latency with the prefill and total ratios to 576 tokens."""
    full = next((r for r in rows if r.scale == max(r.scale for r in rows)), rows[0])
    lines = [
        f"model `{backend.model_id}`; {machine_line(backend)}",
        "",
        "| tokens | encode ms | prefill ms | decode ms | new tokens | total ms | prefill vs max | total vs max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scale} | {r.encode_ms:.1f} | {r.prefill_ms:.1f} | {r.decode_ms:.1f} | {r.new_tokens:.1f} "
            f"| {r.total_ms:.1f} | {r.prefill_ms / full.prefill_ms:.2f}x | {r.total_ms / full.total_ms:.2f}x |"
        )
    return "\n".join(lines)
