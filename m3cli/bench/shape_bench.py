"""``m3 bench ... --shape``: the latency, batch, escalation and GGUF benches on a paper-scale random-weight model.

Each run resolves the shape, picks its dtype, refuses in one line when memory is short, builds the model
in memory (``shapes``) and then runs the same measurement functions as the shipped-model benches, through
the project's own backends. The batch bench times the stock ``generate`` loop on the untouched model
first, then wraps that same model in the torch backend (which drops the unused last tower layer).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

from m3cli.bench.scenes import BENCH_QUESTION, scene_files
from m3cli.bench.shape_model import build_shape, shape_backend
from m3cli.bench.shapes import Shape, check_memory, dtype_reason, param_count, pick_shape_dtype, resolve_shape
from m3cli.bench.throughput import ScaleRun, ThroughputRow, batch_throughput, scale_sweep, stock_generate_loop
from m3cli.errors import UsageError

TEXT_ROWS = 64  # generous: the vicuna_v1 prompt around the image is ~45 tokens with the bench questions


@dataclass
class ShapeRun:
    """Where and how a shape was run (the heading of every shape table)."""

    shape: Shape
    device: str
    dtype: object
    n_params: int
    need_bytes: int
    max_new_tokens: int
    forced_tokens: bool = True  # EOS suppressed everywhere (torch); llama.cpp's own loop cannot be told

    def heading(self) -> str:
        """Two lines: the architecture and what the numbers mean."""
        eos = (f"EOS is suppressed so every answer is exactly {self.max_new_tokens} new tokens" if self.forced_tokens
               else f"answers are capped at {self.max_new_tokens} new tokens, EOS suppressed where the API allows")
        return (f"shape `{self.shape.name}`: {self.shape.describe()}; {self.n_params / 1e9:.2f} B parameters, "
                f"{self.dtype if isinstance(self.dtype, str) else dtype_reason(self.device, self.dtype)}, "
                f"device {self.device}, ~{self.need_bytes / 2**30:.1f} GiB "
                "estimated.\nRANDOM weights made in memory (fixed-seed fill, never downloaded): answers are "
                f"meaningless; {eos}.")


def prepare(shape_name: str, layers: int | None, device: str, dtype: str, batch: int, max_scale: int,
            max_new_tokens: int, threads: int | None = None) -> ShapeRun:
    """Resolve the shape, its device and dtype, and refuse (one line) before building when memory is short."""
    import torch

    from m3cli.backends.torch import pick_device

    if threads:
        torch.set_num_threads(threads)
    shape = resolve_shape(shape_name, layers)
    where = pick_device(device)
    dt = pick_shape_dtype(where, dtype)
    n_params = param_count(shape)
    visual = shape.max_visual_rows if shape.next_ else max_scale
    need = check_memory(shape, dt, where, batch=batch, max_rows=TEXT_ROWS + visual + max_new_tokens,
                        n_params=n_params)
    return ShapeRun(shape, where, dt, n_params, need, max_new_tokens)


def open_shape(run: ShapeRun, threads: int | None = None):
    """Build the shape and wrap it in the project's torch backend (EOS suppressed)."""
    return shape_backend(build_shape(run.shape, run.device, run.dtype), threads=threads)


# ---------------------------------------------------------------------------------------------
# batch: the naive loop on the untouched model, then every scale through m3 batch
# ---------------------------------------------------------------------------------------------
@dataclass
class ShapeBatchReport:
    run: ShapeRun
    naive: ThroughputRow | None
    sweep: list[ScaleRun]
    batch_size: int
    backend: object


def shape_batch(run: ShapeRun, count: int, batch_size: int, scales: Sequence[int], workdir: str,
                naive_count: int | None = None, skip_naive: bool = False,
                threads: int | None = None) -> ShapeBatchReport:
    """The stock ``generate`` loop at 576 (untouched model, fixed-length answers), then ``m3 batch --tokens s``
    for every scale over the same ``count`` scenes."""
    built = build_shape(run.shape, run.device, run.dtype)
    paths = scene_files(workdir, count)
    naive = None
    if not skip_naive:
        naive_paths = paths[: naive_count or count]
        if run.device != "cpu":  # first CUDA calls pay library start-up; on CPU one item costs far more than it
            stock_generate_loop(built.model, built.processor, run.device, naive_paths[:1], BENCH_QUESTION, 1,
                                fixed_length=True)
        naive = stock_generate_loop(built.model, built.processor, run.device, naive_paths, BENCH_QUESTION,
                                    run.max_new_tokens, fixed_length=True, warm_up=False)
    backend = shape_backend(built, threads=threads)
    # warm-up: one small item (allocations, kernel selection), untimed
    batch_throughput(backend, paths[:1], BENCH_QUESTION, min(scales), 1, min(2, run.max_new_tokens))
    sweep = scale_sweep(backend, paths, BENCH_QUESTION, scales, batch_size, run.max_new_tokens)
    return ShapeBatchReport(run, naive, sweep, batch_size, backend)


# ---------------------------------------------------------------------------------------------
# gguf: the same weights as a GGUF pair; stock handler at 576 against our llama.cpp backend
# ---------------------------------------------------------------------------------------------
@dataclass
class ShapeGgufReport:
    run: ShapeRun
    rows: list[ThroughputRow]  # the stock handler first: the baseline
    gguf_path: str
    mmproj_path: str
    quant: str
    notes: list[str]
    backend: object  # the llama.cpp backend that was timed (closed)


def prepare_gguf(shape_name: str, layers: int | None, quant: str, max_new_tokens: int,
                 threads: int | None = None) -> ShapeRun:
    """The shape for ``m3 bench gguf``: llama.cpp on the CPU holds the quantised LM (memory-mapped) plus its
    KV cache; the F16 file is written one tensor at a time, so the torch model is never built."""
    from m3cli.bench.shape_gguf import BYTES_PER_WEIGHT
    from m3cli.bench.shapes import ShapeMemoryError, available_memory, memory_needed

    shape = resolve_shape(shape_name, layers)
    if shape.next_:
        raise UsageError(f"--shape {shape.name}: m3 bench gguf times LLaVA-1.5 shapes (m3 convert --to gguf does "
                         "not write LLaVA-NeXT pairs; time a 1.6 pair made by llama.cpp's scripts with --model)")
    n_params = param_count(shape)
    # the quantised weights at their own width, then one KV cache (2048 positions, f16) and the working set
    need = int(n_params * BYTES_PER_WEIGHT[quant] * 1.1) + memory_needed(shape, 2, 1, 2048, n_params=0)
    free, where = available_memory("cpu")
    if free is not None and need > free:
        raise ShapeMemoryError(f"--shape {shape.name} as {quant} GGUF needs ~{need / 2**30:.1f} GiB but only "
                               f"{free / 2**30:.1f} GiB is free ({where}): use --layers N or --quant q4_0")
    return ShapeRun(shape, "cpu", f"{quant} LM + f16 mmproj (llama.cpp)", n_params, need, max_new_tokens,
                    forced_tokens=False)


def shape_gguf(run: ShapeRun, quant: str, count: int, tokens: int, max_new_tokens: int, threads: int | None,
               workdir: str) -> ShapeGgufReport:
    """Write (or reuse) the shape's GGUF pair, then time the stock handler at 576 (flash attention off and
    on) and our llama.cpp backend at 576 and at ``tokens``, one item at a time, on the CPU."""
    from pathlib import Path

    from m3cli.backends import open_backend
    from m3cli.bench.gguf import stock_llava15_loop
    from m3cli.bench.shape_gguf import shape_gguf_pair
    _quiet_llama()
    lm, mmproj, notes = shape_gguf_pair(run.shape, Path(workdir), quant, threads)
    gc.collect()
    paths = scene_files(Path(workdir) / "scenes", count)
    rows = [stock_llava15_loop(str(lm), str(mmproj), paths, BENCH_QUESTION, max_new_tokens, threads,
                               flash_attn=fa, suppress_eos=True) for fa in (False, True)]
    cpp = open_backend(str(lm), backend="llamacpp", mmproj=str(mmproj), threads=threads, device="cpu",
                       n_gpu_layers=0)
    try:
        batch_throughput(cpp, paths[:1], BENCH_QUESTION, tokens, 1, min(2, max_new_tokens))  # warm-up
        for t in (576, tokens):
            rows.append(batch_throughput(cpp, paths, BENCH_QUESTION, t, 1, max_new_tokens,
                                         label=f"m3 batch --backend llamacpp --tokens {t}"))
    finally:
        cpp.close()
    return ShapeGgufReport(run, rows, str(lm), str(mmproj), quant, notes, cpp)


def _quiet_llama() -> None:
    """llama.cpp's logs (the quantizer prints a line per tensor) go to stderr only under -v."""
    try:
        from m3cli import logs
        from m3cli.backends.llamacpp import native

        llama_cpp, mtmd = native.libs()
        native.set_logging(llama_cpp, mtmd, logs.verbosity() >= 1)
    except Exception:  # noqa: BLE001 - missing extra: the backend reports it in one line later
        pass
