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


@dataclass
class ThroughputRow:
    label: str
    items: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def scene_files(directory, n: int) -> list[str]:
    """Write ``n`` test-split scenes as PNG files (the same set on every machine)."""
    from pathlib import Path

    from m3cli.data.scenes import render, sample

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"scene-{i:05d}.png"
        if not path.exists():
            render(sample("test", i).scene).save(path)
        paths.append(str(path))
    return paths


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


def runner_throughput(backend, paths: Sequence[str], question: str, tokens: int | None, batch_size: int,
                      max_new_tokens: int, auto_scale: bool = False, label: str | None = None) -> ThroughputRow:
    """Items/s of the ``m3 batch`` engine (decode thread, batching, ordered JSONL to a null sink)."""
    import io

    from m3cli.media import iter_inputs
    from m3cli.output import JsonlSink, OrderedWriter, Summary
    from m3cli.runner import BatchOptions, run_batch

    opts = BatchOptions(question=question, tokens=tokens, auto_scale=auto_scale, batch_size=batch_size,
                        max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    run_batch(backend, iter_inputs(list(paths)), opts, OrderedWriter(JsonlSink(io.StringIO())), Summary())
    mode = "--auto-scale" if auto_scale else f"--tokens {tokens}"
    return ThroughputRow(label or f"m3 batch {mode} --batch-size {batch_size}", len(paths),
                         time.perf_counter() - start)


def format_throughput(rows: Sequence[ThroughputRow], baseline: ThroughputRow, backend: Backend) -> str:
    lines = [f"model `{backend.model_id}`; {machine_line(backend)}", "",
             "| run | items | seconds | items/s | vs naive |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.items} | {r.seconds:.1f} | {r.items_per_s:.2f} "
                     f"| {r.items_per_s / baseline.items_per_s:.2f}x |")
    return "\n".join(lines)


@dataclass
class EscalationTiming:
    items: int
    auto_ms: float  # mean per item, escalation (encode once + every rung tried)
    fixed_ms: float  # mean per item, one fixed pass (encode + answer) at the scale escalation ended on
    mean_tokens: float
    mean_rungs: float

    @property
    def ratio(self) -> float:
        return self.auto_ms / self.fixed_ms


def escalation_overhead(backend, n: int = 100, threshold: float | None = None, max_new_tokens: int = 4,
                        split: str = "test") -> EscalationTiming:
    """Per item: --auto-scale time against one fixed pass at the scale where that item ended (one run).

    Both sides include the image encode; items are timed one at a time so each has its own time.
    """
    from m3cli.answering import ask_images
    from m3cli.data.scenes import iter_questions, render
    from m3cli.policy import DEFAULT_THRESHOLD, Escalate, Fixed

    policy = Escalate(tuple(sorted(backend.scales)), DEFAULT_THRESHOLD if threshold is None else threshold)
    pairs = list(iter_questions(split, n))
    ask_images(backend, [render(pairs[0][0].scene)], [pairs[0][1].question], [Fixed(1)], max_new_tokens)  # warm-up
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
    return EscalationTiming(len(pairs), 1000 * statistics.mean(auto), 1000 * statistics.mean(fixed),
                            statistics.mean(tokens), statistics.mean(rungs))


def peak_rss_of_batch(model: str | None, image_paths: Sequence[str], n_items: int, tokens: int = 9,
                      batch_size: int = 8) -> float:
    """Peak RSS (MiB) of a separate ``m3 batch`` process answering ``n_items`` stdin JSONL rows.

    Rows cycle over ``image_paths`` with unique ids, so the run streams ``n_items`` real items.
    """
    import json
    import subprocess
    import sys

    rows = "".join(json.dumps({"image": image_paths[i % len(image_paths)], "id": f"item-{i}"}) + "\n"
                   for i in range(n_items))
    cmd = [sys.executable, "-m", "m3cli.cli", "batch", "-", "-q", BENCH_QUESTION, "--tokens", str(tokens),
           "--batch-size", str(batch_size), "--max-new-tokens", "4", "-o", "/dev/null", "--no-progress"]
    if model:
        cmd += ["--model", model]
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run(sys.argv[1:], input=sys.stdin.read(), text=True, capture_output=True); "
             "sys.stderr.write(r.stderr); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode in (0, 1) else -1)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], input=rows, text=True, capture_output=True, check=True)
    kib = int(out.stdout.strip().splitlines()[-1])
    if kib < 0:
        raise RuntimeError(f"m3 batch failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}")
    return kib / 1024
