"""Speed measurements behind ``m3 bench`` (pure measurement; the CLI formats and prints)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
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

    if backend.name == "llamacpp":
        gpu = getattr(backend, "n_gpu_layers", 0)
        where = f"{platform.processor() or platform.machine()}, {backend.threads} threads"
        return f"llamacpp backend ({where}, {gpu} GPU layers), mmproj {getattr(backend, 'mmproj_path', '?')}"
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
                      max_new_tokens: int, auto_scale: bool = False, label: str | None = None,
                      on_row: Callable[[dict], None] | None = None) -> ThroughputRow:
    """Items/s of the ``m3 batch`` engine (decode thread, batching, ordered JSONL to a null sink)."""
    import io

    from m3cli.media import iter_inputs
    from m3cli.output import JsonlSink, OrderedWriter, Summary
    from m3cli.runner import BatchOptions, run_batch

    opts = BatchOptions(question=question, tokens=tokens, auto_scale=auto_scale, batch_size=batch_size,
                        max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    run_batch(backend, iter_inputs(list(paths)), opts, OrderedWriter(JsonlSink(io.StringIO())), Summary(),
              on_row=on_row)
    mode = "--auto-scale" if auto_scale else f"--tokens {tokens}"
    return ThroughputRow(label or f"m3 batch {mode} --batch-size {batch_size}", len(paths),
                         time.perf_counter() - start)


def format_throughput(rows: Sequence[ThroughputRow], baseline: ThroughputRow, backend: Backend,
                      baseline_name: str = "naive") -> str:
    lines = [f"model `{backend.model_id}`; {machine_line(backend)}", "",
             f"| run | items | seconds | items/s | vs {baseline_name} |", "|---|---:|---:|---:|---:|"]
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


@dataclass
class StreamTiming:
    """One engine run over a stream of items, timed per row as rows reach the writer."""

    label: str
    items: int
    first_batch_s: float  # call start -> the first batch's last row (start-up + one batch)
    total_s: float  # call start -> last row
    steady_items_per_s: float  # rows after the first batch / time after the first batch
    late_items_per_s: float  # the second half of the rows / its time (start-up transients are over)


class RowClock:
    """An ``on_row`` callback that stamps the arrival time of every row."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, row: dict) -> None:
        self.stamps.append(time.perf_counter())

    def timing(self, label: str, batch_size: int) -> StreamTiming:
        n = len(self.stamps)
        if n == 0:
            raise RuntimeError("no rows were written")
        first = min(batch_size, n) - 1
        after = self.stamps[-1] - self.stamps[first]
        steady = (n - 1 - first) / after if after > 0 and n - 1 > first else float("nan")
        half = n // 2
        late_time = self.stamps[-1] - self.stamps[half]
        late = (n - 1 - half) / late_time if late_time > 0 and n - 1 > half else float("nan")
        return StreamTiming(label, n, self.stamps[first] - self.start, self.stamps[-1] - self.start, steady, late)


@dataclass
class ScaleOutReport:
    rows: list[StreamTiming]
    ray_init_s: float | None  # None: Ray was already running (not started by the bench)
    ray_shutdown_s: float | None
    warm_up_s: float  # one short untimed Ray run first: the cluster's worker processes start there
    warm_up_items: int


def single_process_stream(backend, paths: Sequence[str], tokens: int, batch_size: int,
                          max_new_tokens: int) -> StreamTiming:
    """``m3 batch`` in this process (model already loaded), rows to a null sink."""
    clock = RowClock()
    runner_throughput(backend, paths, BENCH_QUESTION, tokens, batch_size, max_new_tokens, on_row=clock)
    return clock.timing("single process (`m3 batch`)", batch_size)


def ray_stream(model_kw: dict, paths: Sequence[str], tokens: int, batch_size: int, max_new_tokens: int,
               actors: int) -> StreamTiming:
    """``m3 batch --engine ray --actors N`` against the already connected cluster, rows to a null sink.

    Every call starts its own actors, so ``first_batch_s`` holds the actors' start-up and model load."""
    import io

    from m3cli.engines.ray_engine import run_ray
    from m3cli.media import iter_inputs
    from m3cli.output import JsonlSink, OrderedWriter, Summary
    from m3cli.runner import BatchOptions

    opts = BatchOptions(question=BENCH_QUESTION, tokens=tokens, batch_size=batch_size, max_new_tokens=max_new_tokens)
    clock = RowClock()
    run_ray(model_kw, iter_inputs(list(paths)), opts, OrderedWriter(JsonlSink(io.StringIO())), Summary(),
            actors=actors, on_row=clock)
    return clock.timing(f"Ray, {actors} actor{'s' if actors > 1 else ''}", batch_size)


def scale_out(backend, model_kw: dict, paths: Sequence[str], tokens: int = 9, batch_size: int = 8,
              max_new_tokens: int = 4, actor_counts: Sequence[int] = (1, 2),
              ray_address: str | None = None) -> ScaleOutReport:
    """Single process against ``--engine ray`` with each actor count; Ray's own start and stop timed apart."""
    from m3cli.engines.ray_engine import connect, import_ray

    single_process_stream(backend, paths[:batch_size], tokens, batch_size, max_new_tokens)  # warm-up
    rows = [single_process_stream(backend, paths, tokens, batch_size, max_new_tokens)]
    ray = import_ray()
    t0 = time.perf_counter()
    owned = connect(ray, ray_address)
    init_s = time.perf_counter() - t0 if owned else None
    shutdown_s = None
    try:
        warm_up = paths[: 2 * batch_size]
        t0 = time.perf_counter()  # as the single process is warmed up, so is the cluster: workers start here
        ray_stream(model_kw, warm_up, tokens, batch_size, max_new_tokens, max(actor_counts))
        warm_up_s = time.perf_counter() - t0
        for actors in actor_counts:
            rows.append(ray_stream(model_kw, paths, tokens, batch_size, max_new_tokens, actors))
    finally:
        if owned:
            t0 = time.perf_counter()
            ray.shutdown()
            shutdown_s = time.perf_counter() - t0
    return ScaleOutReport(rows, init_s, shutdown_s, warm_up_s, len(warm_up))


def format_scale_out(report: ScaleOutReport, backend: Backend, tokens: int, batch_size: int) -> str:
    base = report.rows[0]
    lines = [f"model `{backend.model_id}`; {machine_line(backend)}; --tokens {tokens} --batch-size {batch_size}", "",
             "| engine | items | start-up + first batch s | whole run s | whole-run items/s "
             "| after first batch items/s | vs single | second half items/s | vs single |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        lines.append(f"| {r.label} | {r.items} | {r.first_batch_s:.2f} | {r.total_s:.2f} | {r.items / r.total_s:.2f} "
                     f"| {r.steady_items_per_s:.2f} | {r.steady_items_per_s / base.steady_items_per_s:.2f}x "
                     f"| {r.late_items_per_s:.2f} | {r.late_items_per_s / base.late_items_per_s:.2f}x |")
    init = "already running" if report.ray_init_s is None else f"{report.ray_init_s:.2f} s"
    stop = "not stopped (not started here)" if report.ray_shutdown_s is None else f"{report.ray_shutdown_s:.2f} s"
    lines += ["", f"Ray start (`ray.init`, local cluster): {init}; untimed warm-up run ({report.warm_up_items} "
              f"items, worker processes start): {report.warm_up_s:.2f} s; `ray.shutdown`: {stop}. "
              "Every timed Ray run starts its own actors and loads the model in each (the first-batch column).",
              "After first batch = rows after the first batch / time from its last row to the last row; second half = "
              "the same over the last half of the rows (Ray's decode workers start during the first seconds). "
              "The single process had its model loaded and warmed up before the clock started."]
    return "\n".join(lines)


def stock_llava15_loop(lm_path: str, mmproj_path: str, paths: Sequence[str], question: str, max_new_tokens: int,
                       threads: int | None = None, n_ctx: int = 2048, flash_attn: bool = False) -> ThroughputRow:
    """What a llama-cpp-python user writes today: ``Llava15ChatHandler`` + ``create_chat_completion``, one
    image at a time as a data URI, greedy; the full 576-token grid every time (the handler cannot pool).

    The handler runs its CLIP encoder with flash attention only when the ``Llama`` has ``flash_attn=True``
    (off by default); our backend leaves it on ``auto``, which is on for CPU."""
    import base64
    import os

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    llm = Llama(model_path=str(lm_path), chat_handler=Llava15ChatHandler(clip_model_path=str(mmproj_path),
                                                                          verbose=False),
                n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1, n_gpu_layers=0, verbose=False, seed=0,
                flash_attn=flash_attn)

    def ask(path: str) -> str:
        with open(path, "rb") as fh:
            uri = "data:image/png;base64," + base64.b64encode(fh.read()).decode()
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": question}]}],
            max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["message"]["content"]

    try:
        ask(paths[0])  # warm-up (first encode allocates the CLIP graph)
        start = time.perf_counter()
        for path in paths:
            ask(path)
        label = "stock `Llava15ChatHandler`, 576 tokens, one by one" + (", flash_attn=True" if flash_attn else "")
        return ThroughputRow(label, len(paths),
                             time.perf_counter() - start)
    finally:
        llm.close()
