"""Markdown tables for ``m3 bench`` (and the ``m3 eval --tune`` table): measurements in, text out."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING

from m3cli.backends.base import Backend

if TYPE_CHECKING:  # the measurement modules import the engines; the tables need only their row types
    from m3cli.bench.escalation import EscalationTiming
    from m3cli.bench.gguf import GgufComparison
    from m3cli.bench.latency import LatencyRow
    from m3cli.bench.memory import MemoryGrowth
    from m3cli.bench.ray import ScaleOutReport
    from m3cli.bench.throughput import ThroughputRow


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


def _model_line(backend: Backend) -> str:
    return f"model `{backend.model_id}`; {machine_line(backend)}"


def format_latency_table(rows: Sequence[LatencyRow], backend: Backend) -> str:
    """Per-scale latency with the prefill and total ratios to the largest scale."""
    full = next((r for r in rows if r.scale == max(r.scale for r in rows)), rows[0])
    lines = [
        _model_line(backend),
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


def format_throughput(rows: Sequence[ThroughputRow], baseline: ThroughputRow, backend: Backend,
                      baseline_name: str = "naive") -> str:
    """Items/s of each run and its ratio to ``baseline``."""
    lines = [_model_line(backend), "",
             f"| run | items | seconds | items/s | vs {baseline_name} |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.items} | {r.seconds:.1f} | {r.items_per_s:.2f} "
                     f"| {r.items_per_s / baseline.items_per_s:.2f}x |")
    return "\n".join(lines)


def format_gguf(report: GgufComparison) -> str:
    """The GGUF pair and HF model compared, then their throughput against the stock handler."""
    head = f"GGUF `{report.gguf_path}` + `{report.mmproj_path}`; HF `{report.hf_dir}`"
    table = format_throughput(report.rows, report.rows[0], report.backend, baseline_name="stock handler")
    return f"{head}\n\n{table}"


def format_escalation(t: EscalationTiming, backend: Backend) -> str:
    """--auto-scale time per item against one fixed pass at the final scale."""
    return (f"{_model_line(backend)}\n\n"
            "| items | auto-scale ms/item | fixed pass at final scale ms/item | ratio | mean tokens | mean rungs |\n"
            "|---:|---:|---:|---:|---:|---:|\n"
            f"| {t.items} | {t.auto_ms:.1f} | {t.fixed_ms:.1f} | {t.ratio:.2f}x | {t.mean_tokens:.1f} "
            f"| {t.mean_rungs:.2f} |")


def format_memory(m: MemoryGrowth) -> str:
    """Peak RSS of the short and the long stream, and their ratio."""
    return ("| items | peak RSS MiB |\n|---:|---:|\n"
            f"| {m.small} | {m.small_mib:.0f} |\n| {m.large} | {m.large_mib:.0f} |\n\n"
            f"ratio {m.ratio:.3f} ({100 * (m.ratio - 1):+.1f}%)")


def format_scale_out(report: ScaleOutReport, backend: Backend, tokens: int, batch_size: int) -> str:
    """Each engine's start-up, whole-run and steady rates against the single process, then Ray's own costs."""
    base = report.rows[0]
    lines = [f"{_model_line(backend)}; --tokens {tokens} --batch-size {batch_size}", "",
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


def format_tuning(rows: Sequence[dict], tuned: dict | None) -> str:
    """``m3 eval --tune``: every (measure, threshold) tried, then the pick. (It belongs with evaluate's own
    formatter; it sits here until that module grows one, so the CLI formats no table.)"""
    lines = ["", "| measure | threshold | accuracy | mean tokens | mean rungs |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['measure']} | {r['threshold']} | {100 * r['accuracy']:.1f} | {r['mean_tokens']:.1f} "
              f"| {r['mean_rungs']:.2f} |" for r in rows]
    pick = f"measure {tuned['measure']}, threshold {tuned['threshold']}" if tuned else \
        "none within 1 point of full-grid accuracy"
    return "\n".join([*lines, "", f"pick: {pick}"])
