"""Items/s of the ``m3 batch`` engine against what a user would write without m3cli."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m3cli.backends.base import Backend
from m3cli.bench.scenes import BENCH_QUESTION


@dataclass
class ThroughputRow:
    label: str
    items: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def naive_generate_loop(backend, paths: Sequence[str], question: str, max_new_tokens: int) -> ThroughputRow:
    """What a user would write without m3cli: stock ``generate(pixel_values)`` at the full grid, one by one."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from m3cli.media import load_image

    # a fresh, untouched transformers model: the backend's own copy skips the unused last tower layer
    model = LlavaForConditionalGeneration.from_pretrained(backend.model_id, dtype=backend.dtype)
    model = model.to(backend.device).eval()
    processor = backend.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    start = time.perf_counter()
    for path in paths:
        inputs = processor(images=[load_image(path)], text=[prompt], return_tensors="pt").to(backend.device)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return ThroughputRow("naive loop: stock generate(pixel_values), 576 tokens, batch 1", len(paths),
                         time.perf_counter() - start)


def batch_throughput(backend: Backend, paths: Sequence[str], question: str, tokens: int | None, batch_size: int,
                     max_new_tokens: int, auto_scale: bool = False, label: str | None = None,
                     on_row: Callable[[dict], None] | None = None) -> ThroughputRow:
    """Items/s of the ``m3 batch`` engine (decode thread, batching, ordered JSONL to a null sink)."""
    import io

    from m3cli.engines.local import BatchOptions, run_batch
    from m3cli.media import iter_inputs
    from m3cli.output import JsonlSink, OrderedWriter, Summary

    opts = BatchOptions(question=question, tokens=tokens, auto_scale=auto_scale, batch_size=batch_size,
                        max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    run_batch(backend, iter_inputs(list(paths)), opts, OrderedWriter(JsonlSink(io.StringIO())), Summary(),
              on_row=on_row)
    mode = "--auto-scale" if auto_scale else f"--tokens {tokens}"
    return ThroughputRow(label or f"m3 batch {mode} --batch-size {batch_size}", len(paths),
                         time.perf_counter() - start)


def batch_comparison(backend: Backend, paths: Sequence[str], batch_size: int, max_new_tokens: int,
                     skip_naive: bool = False) -> list[ThroughputRow]:
    """The naive loop (unless ``skip_naive``), then ``m3 batch`` at --tokens 576, 9 and --auto-scale."""
    question = BENCH_QUESTION
    batch_throughput(backend, paths[:batch_size], question, 9, batch_size, max_new_tokens)  # warm-up
    rows = [] if skip_naive else [naive_generate_loop(backend, paths, question, max_new_tokens)]
    rows.append(batch_throughput(backend, paths, question, 576, batch_size, max_new_tokens))
    rows.append(batch_throughput(backend, paths, question, 9, batch_size, max_new_tokens))
    rows.append(batch_throughput(backend, paths, question, None, batch_size, max_new_tokens, auto_scale=True))
    return rows
