"""``m3 bench``: speed on your hardware (the tables in docs/benchmarks.md come from here)."""

from __future__ import annotations

import click

from m3cli.cli.app import group
from m3cli.cli.options import INT_LIST, NumberList, model_options

WORKDIR_HELP = "Where the scene PNGs are written."


@group()
def bench():
    """Measure speed on your hardware (results go to docs/benchmarks.md)."""


@bench.command("latency")
@model_options
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="Image to use (default: a generated scene).")
@click.option("--tokens", "scales", type=INT_LIST, default=None,
              help="Scales to time, e.g. 1,9,36,144,576 (default: all).")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=8, show_default=True)
def bench_latency(image, scales, repeat, batch_size, max_new_tokens, **model_kw):
    """Per-scale latency: encode / prefill / decode ms (medians) and the speed-up over 576 tokens."""
    from m3cli.backends import open_backend
    from m3cli.bench.latency import latency_by_scale
    from m3cli.bench.report import format_latency_table

    backend = open_backend(**model_kw)
    rows = latency_by_scale(backend, image_path=image, scales=scales or None, repeat=repeat,
                            batch_size=batch_size, max_new_tokens=max_new_tokens)
    click.echo(format_latency_table(rows, backend))


@bench.command("batch")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--workdir", default="runs/bench-scenes", show_default=True, help=WORKDIR_HELP)
@click.option("--skip-naive", is_flag=True, help="Do not time the naive stock-generate loop.")
def bench_batch(count, batch_size, max_new_tokens, workdir, skip_naive, **model_kw):
    """Images/s of m3 batch (--tokens 9, 576 and --auto-scale) against a naive stock generate() loop."""
    from m3cli.backends import open_backend
    from m3cli.bench.report import format_throughput
    from m3cli.bench.scenes import scene_files
    from m3cli.bench.throughput import batch_comparison

    backend = open_backend(**model_kw)
    rows = batch_comparison(backend, scene_files(workdir, count), batch_size, max_new_tokens, skip_naive)
    click.echo(format_throughput(rows, rows[0], backend))


@bench.command("escalation")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=120, show_default=True)
@click.option("--threshold", type=float, default=None, help="Default: the tuned threshold.")
def bench_escalation(count, threshold, **model_kw):
    """--auto-scale time per item against one fixed pass at the scale where that item ended."""
    from m3cli.backends import open_backend
    from m3cli.bench.escalation import escalation_overhead
    from m3cli.bench.report import format_escalation

    backend = open_backend(**model_kw)
    click.echo(format_escalation(escalation_overhead(backend, n=count, threshold=threshold), backend))


@bench.command("ray")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--tokens", type=click.IntRange(1), default=9, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--actors", "actor_counts", type=NumberList(int, low=1), default="1,2", show_default=True,
              help="Actor counts to time, comma-separated.")
@click.option("--ray-address", default=None, help="Join this cluster instead of starting a local one.")
@click.option("--workdir", default="runs/bench-scenes", show_default=True, help=WORKDIR_HELP)
def bench_ray(count, tokens, batch_size, max_new_tokens, actor_counts, ray_address, workdir, **model_kw):
    """Images/s of --engine ray with 1 and 2 actors against the single process; Ray start-up apart."""
    from m3cli.backends import open_backend
    from m3cli.bench.ray import scale_out
    from m3cli.bench.report import format_scale_out
    from m3cli.bench.scenes import scene_files
    from m3cli.engines.ray import preflight

    preflight(model_kw, ray_address)  # the missing extra or a dead address: one line, before any model load
    backend = open_backend(**model_kw)
    paths = scene_files(workdir, count)
    report = scale_out(backend, model_kw, paths, tokens, batch_size, max_new_tokens, actor_counts, ray_address)
    click.echo(format_scale_out(report, backend, tokens, batch_size))


@bench.command("gguf")
@click.option("-m", "--model", default=None, help="HF model dir or registry name (default: the shipped model).")
@click.option("--gguf", "gguf_path", type=click.Path(dir_okay=False), default=None,
              help="Its GGUF language model (default: convert --model into --workdir).")
@click.option("--mmproj", type=click.Path(dir_okay=False), default=None, help="The GGUF pair's mmproj.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True)
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--tokens", type=click.IntRange(1), default=9, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for every run (default: all cores).")
@click.option("--workdir", default="runs/bench-gguf", show_default=True, help="Scenes and converted GGUF go here.")
def bench_gguf(model, gguf_path, mmproj, outtype, count, tokens, batch_size, max_new_tokens, threads, workdir):
    """Our llama.cpp backend at --tokens against stock Llava15ChatHandler at 576, and our torch backend."""
    from m3cli.bench.gguf import gguf_comparison
    from m3cli.bench.report import format_gguf

    report = gguf_comparison(model, gguf_path, mmproj, outtype, count, tokens, batch_size, max_new_tokens, threads,
                             workdir)
    click.echo(format_gguf(report))


@bench.command("memory")
@click.option("-m", "--model", default=None)
@click.option("--small", type=click.IntRange(1), default=50, show_default=True)
@click.option("--large", type=click.IntRange(1), default=5000, show_default=True)
@click.option("--workdir", default="runs/bench-scenes", show_default=True)
def bench_memory(model, small, large, workdir):
    """Peak RSS of m3 batch over a short and a long stream of items (memory must stay flat)."""
    from m3cli.bench.memory import memory_growth
    from m3cli.bench.report import format_memory

    click.echo(format_memory(memory_growth(model, workdir, small, large)))
