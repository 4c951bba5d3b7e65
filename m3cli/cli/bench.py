"""``m3 bench``: speed on your hardware, as Markdown tables on stdout (docs/benchmarks.md shows ours)."""

from __future__ import annotations

import contextlib
import tempfile

import click

from m3cli.cli.app import group
from m3cli.cli.options import INT_LIST, NON_EMPTY, SIZES, THREADS, THRESHOLD, NumberList, model_options

WORKDIR_HELP = ("Keep the generated scene PNGs in DIR (reused by later runs; default: a temporary folder, removed "
                "at the end).")
SHAPE_HELP = ("Time a paper-scale architecture with RANDOM weights made in memory instead of --model: "
              "llava-1.5-7b, llava-1.5-13b or llava-next-7b (not for gguf).")
LAYERS_HELP = "With --shape: build only N LM layers (quick profiling; LM times scale ~linearly with N)."


def shape_options(fn):
    """--shape / --layers: the random-weight paper-scale models (``m3cli.bench.shapes``)."""
    fn = click.option("--layers", type=click.IntRange(1), default=None, help=LAYERS_HELP)(fn)
    fn = click.option("--shape", default=None, metavar="NAME", help=SHAPE_HELP)(fn)
    return fn


def _check_shape_flags(shape: str | None, layers: int | None, model_kw: dict) -> None:
    """--shape replaces --model and runs the torch backend; --layers needs --shape."""
    from m3cli.backends import GGUF_OPTIONS
    from m3cli.errors import UsageError

    if shape is None:
        if layers is not None:
            raise UsageError("--layers needs --shape")
        return
    if model_kw.get("model"):
        raise UsageError("--shape builds its own model: drop --model")
    if model_kw.get("backend") not in (None, "auto", "torch"):
        raise UsageError("--shape runs the torch backend here (m3 bench gguf --shape times llama.cpp)")
    stray = [k for k in GGUF_OPTIONS if model_kw.get(k) is not None]
    if stray:
        raise UsageError(f"--{stray[0].replace('_', '-')} applies to GGUF models, not --shape")


def _checked_workdir(ctx, param, value):
    """--workdir DIR through the output guard when the command line is read: a folder that takes files (made if
    missing), before any model loads."""
    if value is None:
        return None
    from m3cli.output import check_output_dir

    return check_output_dir(value, "--workdir")  # OutputError: one line, exit 2


@contextlib.contextmanager
def _workdir(path: str | None, what: str = "scenes"):
    """``path``, or a temporary folder removed when the command ends: m3 bench writes nothing unasked."""
    if path is not None:
        click.echo(f"m3 bench: {what} in {path}", err=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="m3-bench-") as tmp:
        yield tmp


class _Runs:
    """One progress counter (:mod:`m3cli.output.progress`) per timed run, each ended when the next starts."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.current = None

    def __call__(self, label: str, total: int | None):
        from m3cli.output.progress import Progress

        self.close()
        self.current = Progress(f"m3 bench {self.command}: {label}", total=total, unit="item")
        return self.current.update

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def __enter__(self) -> _Runs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pick(value, shipped, shaped, shape):
    """An option's default: one for the shipped model, a smaller one for a paper-scale shape."""
    if value is not None:
        return value
    return shaped if shape else shipped


@group()
def bench():
    """Measure speed on your hardware: Markdown tables on stdout (docs/benchmarks.md shows ours).

    Every figure is measured after a warm-up; tables give the median (p50) with its p90 and flag a run whose
    spread is too wide to compare, and name the machine (CPU model, cores, threads, device, load). Progress
    goes to stderr. Nothing is written to disk unless --workdir DIR is given.
    """


@bench.command("latency")
@model_options
@shape_options
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="Image to use (default: a generated scene).")
@click.option("--tokens", "scales", type=INT_LIST, default=None,
              help="Scales to time, e.g. 1,9,36,144,576 (default: all).")
@click.option("--repeat", type=click.IntRange(1, 1000), default=None,
              help="Timed runs per scale, interleaved across scales (default 5; 1 with --shape).")
@click.option("--warmup", type=click.IntRange(0, 100), default=None,
              help="Untimed runs per scale before timing (default 1; 0 with --shape, which warms up once).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=None, help="Default 8 (4 with --shape).")
def bench_latency(image, scales, repeat, warmup, batch_size, max_new_tokens, shape, layers, **model_kw):
    """Per-scale latency: encode / prefill / decode ms (p50, with the p90 of prefill and total) and the
    speed-up over 576 tokens."""
    from m3cli.bench.latency import latency_by_scale
    from m3cli.bench.report import format_latency_table

    _check_shape_flags(shape, layers, model_kw)
    repeat = _pick(repeat, 5, 1, shape)
    warmup = _pick(warmup, 1, 0, shape)
    max_new_tokens = _pick(max_new_tokens, 8, 4, shape)
    if shape:
        from m3cli.bench.report import format_shape_latency
        from m3cli.bench.shape_bench import open_shape, prepare

        run = prepare(shape, layers, model_kw["device"], model_kw["dtype"], batch_size,
                      max(scales) if scales else 576, max_new_tokens, model_kw.get("threads"))
        backend = open_shape(run, model_kw.get("threads"))
        chosen = scales or sorted(backend.scales, reverse=True)
        with _Runs("latency") as runs:
            rows = latency_by_scale(backend, image_path=image, scales=chosen, repeat=repeat, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, warm_up_scale=min(chosen), warmup=warmup,
                                    progress=runs("timed runs", repeat * len(chosen)))
        click.echo(format_shape_latency(rows, backend, run))
        return
    from m3cli.backends import open_backend

    backend = open_backend(**model_kw)
    chosen = scales or sorted(backend.scales, reverse=True)
    with _Runs("latency") as runs:
        rows = latency_by_scale(backend, image_path=image, scales=chosen, repeat=repeat, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, warmup=warmup,
                                progress=runs("timed runs", repeat * len(chosen)))
    click.echo(format_latency_table(rows, backend))


@bench.command("batch")
@model_options
@shape_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=None,
              help="Items (default 200; 4 with --shape).")
@click.option("--batch-size", type=click.IntRange(1, 512), default=None, help="Default 8 (4 with --shape).")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--workdir", default=None, metavar="DIR", callback=_checked_workdir, help=WORKDIR_HELP)
@click.option("--skip-naive", is_flag=True, help="Do not time the naive stock-generate loop.")
@click.option("--tokens", "scales", type=INT_LIST, default=None,
              help="With --shape: the scales to sweep (default: all; include 576 for the Amdahl view).")
@click.option("--naive-n", type=click.IntRange(1), default=None,
              help="With --shape: time the naive loop over only the first N items (default: all -n).")
def bench_batch(count, batch_size, max_new_tokens, workdir, skip_naive, scales, naive_n, shape, layers, **model_kw):
    """Images/s of m3 batch (--tokens 9, 576 and --auto-scale) against a naive stock generate() loop."""
    from m3cli.errors import UsageError

    _check_shape_flags(shape, layers, model_kw)
    count = _pick(count, 200, 4, shape)
    batch_size = _pick(batch_size, 8, 4, shape)
    if shape:
        from m3cli.bench.report import format_shape_batch
        from m3cli.bench.shape_bench import prepare, shape_batch

        threads = model_kw.get("threads")
        run = prepare(shape, layers, model_kw["device"], model_kw["dtype"], batch_size,
                      max(scales) if scales else 576, max_new_tokens, threads)
        chosen = sorted(set(scales), reverse=True) if scales else [576, 144, 36, 9, 1]
        bad = [s for s in chosen if s not in (576, 144, 36, 9, 1)]
        if bad:
            raise UsageError(f"--tokens {bad[0]} is not a nested scale (576, 144, 36, 9, 1)")
        with _workdir(workdir) as where:
            report = shape_batch(run, count, batch_size, chosen, where, naive_n, skip_naive, threads)
        click.echo(format_shape_batch(report))
        return
    if scales is not None or naive_n is not None:
        raise UsageError("--tokens and --naive-n need --shape")
    from m3cli.backends import open_backend
    from m3cli.bench.report import format_throughput
    from m3cli.bench.scenes import scene_files
    from m3cli.bench.throughput import batch_comparison

    backend = open_backend(**model_kw)
    with _workdir(workdir) as where, _Runs("batch") as runs:
        rows = batch_comparison(backend, scene_files(where, count), batch_size, max_new_tokens, skip_naive, runs)
    click.echo(format_throughput(rows, rows[0], backend))


@bench.command("escalation")
@model_options
@shape_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=None,
              help="Items (default 120; 4 with --shape).")
@click.option("--threshold", type=THRESHOLD, default=None,
              help="Default: the model's tuned threshold (0.5 for a model without one, and with --shape).")
@click.option("--ladder", type=INT_LIST, default=None, help="Escalation rungs, e.g. 9,576 (default: every scale).")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
def bench_escalation(count, threshold, ladder, max_new_tokens, shape, layers, **model_kw):
    """--auto-scale time per item against one fixed pass at the scale where that item ended."""
    from m3cli.bench.escalation import escalation_overhead
    from m3cli.bench.report import format_escalation

    _check_shape_flags(shape, layers, model_kw)
    count = _pick(count, 120, 4, shape)
    if shape:
        from m3cli.bench.report import format_shape_escalation
        from m3cli.bench.shape_bench import open_shape, prepare

        run = prepare(shape, layers, model_kw["device"], model_kw["dtype"], 1, max(ladder) if ladder else 576,
                      max_new_tokens, model_kw.get("threads"))
        backend = open_shape(run, model_kw.get("threads"))
        with _Runs("escalation") as runs:
            timing = escalation_overhead(backend, n=count, threshold=threshold, max_new_tokens=max_new_tokens,
                                         ladder=ladder, progress=runs("items", count))
        click.echo(format_shape_escalation(timing, backend, run, threshold, ladder))
        return
    from m3cli.answering.defaults import model_policy
    from m3cli.backends import open_backend

    tuned = model_policy(model_kw.get("model"))
    if threshold is None and tuned is not None:
        threshold = tuned.threshold
    backend = open_backend(**model_kw)
    with _Runs("escalation") as runs:
        timing = escalation_overhead(backend, n=count, threshold=threshold, max_new_tokens=max_new_tokens,
                                     ladder=ladder, progress=runs("items", count),
                                     measure=tuned.measure if tuned is not None else None)
    click.echo(format_escalation(timing, backend))


@bench.command("ray")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--tokens", type=click.IntRange(1), default=9, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--actors", "actor_counts", type=NumberList(int, low=1), default="1,2", show_default=True,
              help="Actor counts to time, comma-separated.")
@click.option("--ray-address", default=None, help="Join this cluster instead of starting a local one.")
@click.option("--workdir", default=None, metavar="DIR", callback=_checked_workdir, help=WORKDIR_HELP)
def bench_ray(count, tokens, batch_size, max_new_tokens, actor_counts, ray_address, workdir, **model_kw):
    """Images/s of --engine ray with 1 and 2 actors against the single process; Ray start-up apart."""
    from m3cli.backends import open_backend
    from m3cli.bench.ray import scale_out
    from m3cli.bench.report import format_scale_out
    from m3cli.bench.scenes import scene_files
    from m3cli.engines.ray import preflight

    preflight(model_kw, ray_address)  # the missing extra or a dead address: one line, before any model load
    backend = open_backend(**model_kw)
    with _workdir(workdir) as where:
        paths = scene_files(where, count)
        report = scale_out(backend, model_kw, paths, tokens, batch_size, max_new_tokens, actor_counts, ray_address)
    click.echo(format_scale_out(report, backend, tokens, batch_size))


@bench.command("gguf")
@click.option("-m", "--model", type=NON_EMPTY, default=None,
              help="HF model dir or registry name (default: the shipped model).")
@shape_options
@click.option("--gguf", "gguf_path", type=click.Path(dir_okay=False), default=None,
              help="Its GGUF language model (default: convert --model into --workdir).")
@click.option("--mmproj", type=click.Path(dir_okay=False), default=None, help="The GGUF pair's mmproj.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True)
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_0"]), default="q4_0", show_default=True,
              help="With --shape: the LM's type (q8_0/q4_0 made by llama.cpp's llama_model_quantize).")
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=None,
              help="Items (default 200; 4 with --shape).")
@click.option("--tokens", type=click.IntRange(1), default=9, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--threads", type=THREADS, default=None, help="CPU threads for every run (default: all cores).")
@click.option("--workdir", default=None, metavar="DIR", callback=_checked_workdir,
              help="Keep the scenes and the converted GGUF pair in DIR (reused by later runs; default: a temporary "
                   "folder, removed at the end).")
def bench_gguf(model, gguf_path, mmproj, outtype, quant, count, tokens, batch_size, max_new_tokens, threads, workdir,
               shape, layers):
    """Our llama.cpp backend at --tokens against stock Llava15ChatHandler at 576, and our torch backend."""
    from m3cli.errors import UsageError

    if shape is None and layers is not None:
        raise UsageError("--layers needs --shape")
    count = _pick(count, 200, 4, shape)
    if shape:
        if model or gguf_path or mmproj:
            raise UsageError("--shape writes its own GGUF pair: drop --model, --gguf and --mmproj")
        from m3cli.bench.report import format_shape_gguf
        from m3cli.bench.shape_bench import prepare_gguf, shape_gguf

        run = prepare_gguf(shape, layers, quant, max_new_tokens, threads)
        with _workdir(workdir, "the GGUF pair and scenes") as where:
            report = shape_gguf(run, quant, count, tokens, max_new_tokens, threads, where)
        click.echo(format_shape_gguf(report))
        return
    from m3cli.bench.gguf import gguf_comparison
    from m3cli.bench.report import format_gguf

    with _workdir(workdir, "the GGUF pair and scenes") as where, _Runs("gguf") as runs:
        report = gguf_comparison(model, gguf_path, mmproj, outtype, count, tokens, batch_size, max_new_tokens,
                                 threads, where, runs)
    click.echo(format_gguf(report))


@bench.command("serve")
@click.option("-m", "--model", type=NON_EMPTY, default=None,
              help="Registry name, HF model directory or GGUF language model (default: the shipped model).")
@click.option("--mmproj", type=click.Path(dir_okay=False), default=None, help="A GGUF pair's mmproj.")
@shape_options
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_0"]), default="q4_0", show_default=True,
              help="With --shape: the LM's type of the GGUF pair written for it.")
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=None,
              help="Distinct scenes per pass (default 200; 16 with --shape).")
@click.option("--concurrency", "concurrencies", type=NumberList(int, low=1, high=1024), default="1,8,32",
              show_default=True, help="Client threads, comma-separated.")
@click.option("--budgets", default="9,576,auto", show_default=True,
              help="m3 serve's budgets to time: 9, 576 and/or auto (--auto-scale).")
@click.option("--repeat", type=click.IntRange(1, 100), default=None, help="Timed passes per cell (default 3; 1 with "
              "--shape); their spread is reported.")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 512), default=8, show_default=True,
              help="m3 serve --max-batch (and the in-process m3 batch's --batch-size).")
@click.option("--threads", type=THREADS, default=None, help="CPU threads of every server (default: all cores).")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="GGUF: also time llama-cpp-python's own server on the same pair at 576.")
@click.option("--workdir", default=None, metavar="DIR", callback=_checked_workdir,
              help="Keep the generated scenes (and --shape's GGUF pair) in DIR, reused by later runs (default: a "
                   "temporary folder, removed at the end).")
def bench_serve(model, mmproj, shape, layers, quant, count, concurrencies, budgets, repeat, max_new_tokens, max_batch,
                threads, peer, workdir):
    """Requests/s and p50/p90/p99 latency of m3 serve at each concurrency and budget, against llama-cpp-python's
    server on the same GGUF pair (576 tokens), or m3 batch in-process on the same items (torch)."""
    from m3cli.bench.report import SERVE_HEADER, format_serve, format_serve_cell
    from m3cli.bench.serve import machine_line, serve_bench
    from m3cli.errors import UsageError

    notes = []
    if shape is None and layers is not None:
        raise UsageError("--layers needs --shape")
    if shape and (model or mmproj):
        raise UsageError("--shape writes its own GGUF pair: drop --model and --mmproj")
    if not shape:
        from m3cli.models.registry import resolve_model

        model = resolve_model(model)
        gguf = model.lower().endswith(".gguf")
        if mmproj and not gguf:
            raise UsageError("--mmproj goes with a GGUF --model")
    count = _pick(count, 200, 16, shape)
    repeat = _pick(repeat, 3, 1, shape)
    chosen = [b.strip() for b in budgets.split(",") if b.strip()]
    machine = machine_line(threads)  # the load before the servers start

    def progress(cell) -> None:
        click.echo(format_serve_cell(cell), err=True)

    with _workdir(workdir, "scenes and GGUF files" if shape else "scenes") as where:
        if shape:
            from m3cli.bench.shape_bench import prepare_gguf
            from m3cli.bench.shape_gguf import shape_gguf_pair

            run = prepare_gguf(shape, layers, quant, max_new_tokens, threads)
            lm, mm, made = shape_gguf_pair(run.shape, where, quant, threads)
            model, mmproj, gguf = str(lm), str(mm), True
            notes.append(f"{run.heading()}; {'; '.join(made)} (random weights: answers run until an end token or "
                         "max_tokens, counted in 'new tokens')")
        click.echo(SERVE_HEADER, err=True)
        report = serve_bench(model, mmproj, gguf, count, concurrencies, chosen, repeat, max_new_tokens, max_batch,
                             threads, where, peer=peer, notes=notes, on_cell=progress)
    click.echo(format_serve(report, machine))


@bench.command("memory")
@click.option("-m", "--model", type=NON_EMPTY, default=None)
@click.option("--small", type=click.IntRange(1), default=50, show_default=True)
@click.option("--large", type=click.IntRange(1), default=5000, show_default=True)
@click.option("--workdir", default=None, metavar="DIR", callback=_checked_workdir, help=WORKDIR_HELP)
def bench_memory(model, small, large, workdir):
    """Peak RSS of m3 batch over a short and a long stream of items (memory must stay flat)."""
    from m3cli.bench.memory import memory_growth
    from m3cli.bench.report import format_memory

    with _workdir(workdir) as where:
        growth = memory_growth(model, where, small, large)
    click.echo(format_memory(growth))


@bench.command("decode")
@click.option("--sizes", type=SIZES, default="4032x3024,6000x4000,8000x6000", show_default=True, metavar="WxH,...",
              help="JPEG sizes to generate and time, comma-separated WxH.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Timed runs of each path, per size and preprocessing.")
@click.option("--warm-up", type=click.IntRange(0, 100), default=1, show_default=True,
              help="Untimed runs of each path first.")
def bench_decode(sizes, repeat, warm_up):
    """What --fast-decode buys: decode + crops at 336 px (LLaVA-1.5 pad and crop, NeXT), and how the pixels move."""
    from m3cli.bench.decode import decode_comparison
    from m3cli.bench.report import format_decode

    click.echo(format_decode(decode_comparison(sizes, repeat=repeat, warm_up=warm_up)))


@bench.command("profile")
@click.option("--shape", required=True, metavar="NAME", help="The architecture to profile (see --shape above).")
@click.option("--layers", type=click.IntRange(1), default=2, show_default=True, help=LAYERS_HELP)
@click.option("--tokens", "scales", type=INT_LIST, default="576,9", show_default=True, help="Scales to prefill.")
@click.option("--batch", "batches", type=NumberList(int, low=1), default="1,8", show_default=True,
              help="Batch sizes to prefill.")
@click.option("--attn", "attention", default="sdpa,eager", show_default=True,
              help="Attention implementations to compare, comma-separated.")
@click.option("--repeat", type=click.IntRange(1, 100), default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--threads", type=THREADS, default=None)
def bench_profile(shape, layers, scales, batches, attention, repeat, device, dtype, threads):
    """Where a small prefill's time goes: matmul rate by rows, decoder layers per forward, sdpa vs eager."""
    from m3cli.bench.profile import layer_timings, matmul_rates, memcpy_gbps
    from m3cli.bench.report import format_profile
    from m3cli.bench.shape_bench import open_shape, prepare
    from m3cli.errors import UsageError

    attn = [a.strip() for a in attention.split(",") if a.strip()]
    bad = [a for a in attn if a not in ("sdpa", "eager")]
    if bad:
        raise UsageError(f"--attn {bad[0]!r}: use sdpa and/or eager")
    run = prepare(shape, layers, device, dtype, max(batches), max(scales), 3, threads)
    backend = open_shape(run, threads)
    cfg = backend.model.config.text_config
    rows = sorted({1, 9, 16, 50, 128, *(b * len(backend.prompt_ids("q", s)) for s in scales for b in batches)})
    rates = matmul_rates(rows, cfg.hidden_size, cfg.intermediate_size, [run.dtype])
    timings = layer_timings(backend, scales, batches, attn, repeat)
    click.echo(format_profile(run, rates, timings, memcpy_gbps()))
