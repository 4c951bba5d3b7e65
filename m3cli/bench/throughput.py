"""Items/s of the ``m3 batch`` engine against what a user would write without m3cli."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m3cli.backends.base import Backend
from m3cli.bench.scenes import BENCH_QUESTION
from m3cli.bench.stats import Spread


@dataclass
class ThroughputRow:
    label: str
    items: int
    seconds: float
    new_tokens: float | None = None  # mean new tokens per answer, where counted
    per_item: Spread | None = None  # ms per item over the run's batches (a one-by-one loop: its images)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def one_by_one(label: str, paths: Sequence[str], answer: Callable[[str], int],
               progress: Callable[[int], None] | None = None) -> ThroughputRow:
    """Time ``answer(path)`` (which returns its new tokens) over ``paths``, one image at a time: the whole run,
    the mean new tokens, and the per-image spread (the loops a user writes without m3cli)."""
    start = time.perf_counter()
    tokens, each = [], []
    for path in paths:
        t0 = time.perf_counter()
        tokens.append(answer(path))
        each.append(1000 * (time.perf_counter() - t0))
        if progress is not None:
            progress(1)
    return ThroughputRow(label, len(paths), time.perf_counter() - start, sum(tokens) / max(len(tokens), 1),
                         Spread.of(each))


def naive_generate_loop(backend, paths: Sequence[str], question: str, max_new_tokens: int,
                        progress: Callable[[int], None] | None = None) -> ThroughputRow:
    """What a user would write without m3cli: stock ``generate(pixel_values)`` at the full grid, one by one."""
    from transformers import LlavaForConditionalGeneration

    # a fresh, untouched transformers model: the backend's own copy skips the unused last tower layer
    model = LlavaForConditionalGeneration.from_pretrained(backend.model_id, dtype=backend.dtype)
    model = model.to(backend.device).eval()
    return stock_generate_loop(model, backend.processor, backend.device, paths, question, max_new_tokens,
                               progress=progress)


def stock_generate_loop(model, processor, device: str, paths: Sequence[str], question: str, max_new_tokens: int,
                        fixed_length: bool = False, progress: Callable[[int], None] | None = None,
                        warm_up: bool = True) -> ThroughputRow:
    """Stock ``processor(...)`` + ``model.generate(pixel_values=...)`` over ``paths``, one image at a time, on an
    untouched model, after one untimed item (``warm_up``). ``fixed_length`` forces exactly ``max_new_tokens``
    new tokens (``min_new_tokens``), as the random-weight shapes need for a like-for-like timing."""
    import torch

    from m3cli.media import load_image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    extra = {"min_new_tokens": max_new_tokens} if fixed_length else {}
    def one(path: str) -> int:
        inputs = processor(images=[load_image(path)], text=[prompt], return_tensors="pt").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out.shape[-1] - inputs["input_ids"].shape[-1]

    if warm_up:
        one(paths[0])
    return one_by_one("naive loop: stock generate(pixel_values), 576 tokens, batch 1", paths, one, progress)


class TokenCounter:
    """A backend seen through its ``answer`` calls: counts the answers and the new tokens they generated."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.answers = 0
        self.tokens = 0

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def answer(self, requests):
        from m3cli.bench.latency import generated_tokens

        gens = self._backend.answer(requests)
        self.answers += len(gens)
        self.tokens += sum(generated_tokens(g, r.max_new_tokens) for g, r in zip(gens, requests, strict=True))
        return gens

    @property
    def mean(self) -> float | None:
        return self.tokens / self.answers if self.answers else None


def batch_throughput(backend: Backend, paths: Sequence[str], question: str, tokens: int | None, batch_size: int,
                     max_new_tokens: int, auto_scale: bool = False, label: str | None = None,
                     on_row: Callable[[dict], None] | None = None,
                     progress: Callable[[int], None] | None = None) -> ThroughputRow:
    """Items/s of the ``m3 batch`` engine (decode thread, batching, ordered JSONL to a null sink), and the spread
    of its ms per item over its batches (from the times its rows arrive; rows come a batch at a time).

    A fixed ``tokens`` or ``auto_scale`` with the fallback threshold: the bench never applies a model's tuned
    policy, so the rows it times are the same on every model."""
    import io

    from m3cli.engines.local import BatchOptions, run_batch
    from m3cli.media import iter_inputs
    from m3cli.output import JsonlSink, OrderedWriter, Summary

    opts = BatchOptions(question=question, tokens=tokens, auto_scale=auto_scale, batch_size=batch_size,
                        max_new_tokens=max_new_tokens)
    counter = TokenCounter(backend)
    arrivals: list[float] = []

    def arrived(row: dict) -> None:
        arrivals.append(time.perf_counter())
        if on_row is not None:
            on_row(row)
        if progress is not None:
            progress(1)

    start = time.perf_counter()
    run_batch(counter, iter_inputs(list(paths)), opts, OrderedWriter(JsonlSink(io.StringIO())), Summary(),
              on_row=arrived)
    mode = "--auto-scale" if auto_scale else f"--tokens {tokens}"
    return ThroughputRow(label or f"m3 batch {mode} --batch-size {batch_size}", len(paths),
                         time.perf_counter() - start, counter.mean, batch_spread(start, arrivals, batch_size))


def batch_spread(start: float, arrivals: Sequence[float], batch_size: int) -> Spread:
    """ms per item of each batch: the time from the previous batch's last row (the start, for the first) to
    this batch's last row, over its rows."""
    per_item, before = [], start
    for first in range(0, len(arrivals), batch_size):
        chunk = arrivals[first:first + batch_size]
        per_item.append(1000 * (chunk[-1] - before) / len(chunk))
        before = chunk[-1]
    return Spread.of(per_item)


def batch_comparison(backend: Backend, paths: Sequence[str], batch_size: int, max_new_tokens: int,
                     skip_naive: bool = False, progress: Callable[[str, int], Callable[[int], None]] | None = None
                     ) -> list[ThroughputRow]:
    """The naive loop (unless ``skip_naive``), then ``m3 batch`` at --tokens 576, 9 and --auto-scale, each after
    an untimed warm-up of its own. ``progress(label, total)`` gives each run its progress counter."""
    question = BENCH_QUESTION
    tick = progress or (lambda label, total: None)
    rows = [] if skip_naive else [naive_generate_loop(backend, paths, question, max_new_tokens,
                                                      tick("naive loop", len(paths)))]
    for tokens, auto in ((576, False), (9, False), (None, True)):
        batch_throughput(backend, paths[:batch_size], question, tokens, batch_size, max_new_tokens, auto)  # warm-up
        label = "--auto-scale" if auto else f"--tokens {tokens}"
        rows.append(batch_throughput(backend, paths, question, tokens, batch_size, max_new_tokens, auto,
                                     progress=tick(label, len(paths))))
    return rows


@dataclass
class ScaleRun:
    """One ``m3 batch --tokens s`` run with the mean per-item stage times its rows report."""

    scale: int
    row: ThroughputRow
    encode_ms: float  # vision tower + projector, per item
    lm_ms: float  # prefill + decode, per item (a batch's time shared by its items)

    @property
    def stage_ms(self) -> float:
        return self.encode_ms + self.lm_ms


class StageClock:
    """An ``on_row`` callback keeping each row's stage timings; an error row is a failed benchmark."""

    def __init__(self) -> None:
        self.encode: list[float] = []
        self.lm: list[float] = []

    def __call__(self, row: dict) -> None:
        if row.get("error"):
            raise RuntimeError(f"bench item failed: {row['error']}")
        t = row.get("timings") or {}
        self.encode.append(float(t.get("encode_ms", 0.0)))
        self.lm.append(float(t.get("prefill_ms", 0.0)) + float(t.get("decode_ms", 0.0)))

    def run(self, scale: int, row: ThroughputRow) -> ScaleRun:
        n = max(len(self.encode), 1)
        return ScaleRun(scale, row, sum(self.encode) / n, sum(self.lm) / n)


def scale_sweep(backend: Backend, paths: Sequence[str], question: str, scales: Sequence[int], batch_size: int,
                max_new_tokens: int) -> list[ScaleRun]:
    """``m3 batch --tokens s`` over the same items at every scale, with the stage times for the Amdahl view."""
    runs = []
    for scale in scales:
        clock = StageClock()
        row = batch_throughput(backend, paths, question, scale, batch_size, max_new_tokens, on_row=clock)
        runs.append(clock.run(scale, row))
    return runs
