"""Markdown tables for ``m3 bench``: measurements in, text out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from m3cli.backends.base import Backend
from m3cli.bench.stats import spread_cell, spread_note

if TYPE_CHECKING:  # the measurement modules import the engines; the tables need only their row types
    from m3cli.bench.decode import DecodeReport, Spread
    from m3cli.bench.escalation import EscalationTiming
    from m3cli.bench.gguf import GgufComparison
    from m3cli.bench.latency import LatencyRow
    from m3cli.bench.memory import MemoryGrowth
    from m3cli.bench.profile import LayerTiming, MatmulRate
    from m3cli.bench.ray import ScaleOutReport
    from m3cli.bench.serve import LoadRun, ServeReport
    from m3cli.bench.shape_bench import ShapeBatchReport, ShapeGgufReport, ShapeRun
    from m3cli.bench.throughput import ScaleRun, ThroughputRow


def machine_line(backend: Backend) -> str:
    """A one-line description of where the numbers were measured: the backend, the CPU (model, usable and all
    cores, threads), the device (a GPU's name) and the load average when the bench started."""
    from m3cli.bench.stats import machine_words

    if backend.name == "llamacpp":
        gpu = getattr(backend, "n_gpu_layers", 0)
        words = machine_words(f"{getattr(backend, 'threads', '?')} llama.cpp threads",
                              f"cpu + {gpu} GPU layers" if gpu else "cpu")
        return f"llamacpp backend ({words}), mmproj {getattr(backend, 'mmproj_path', '?')}"
    import torch

    device = str(getattr(backend, "device", "cpu"))
    where = device
    if device.startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    words = machine_words(f"{torch.get_num_threads()} torch threads", where)
    return f"{backend.name} backend ({words}), dtype {getattr(backend, 'dtype', '?')}"


def _model_line(backend: Backend) -> str:
    return f"model `{backend.model_id}`; {machine_line(backend)}"


def format_latency_table(rows: Sequence[LatencyRow], backend: Backend) -> str:
    """Per-scale latency (p50 of the timed runs) with the prefill and total ratios to the largest scale, the
    decode time per token, (where the backend tells the prompt length) the prefill time per prompt row, and
    the p90 and spread of the prefill and total times."""
    full = next((r for r in rows if r.scale == max(r.scale for r in rows)), rows[0])
    runs = rows[0].total.n if rows and rows[0].total is not None else None
    lines = [
        _model_line(backend),
        "",
        "| tokens | encode ms | prefill ms | decode ms | new tokens | total ms | prefill vs max | total vs max "
        "| decode ms/token | prompt tokens | prefill ms/row | prefill ms p90 | total ms p90 | spread |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    flagged = False
    for r in rows:
        per_token = "-" if r.decode_ms_per_token is None else f"{r.decode_ms_per_token:.1f}"
        prompt = "-" if r.prompt_tokens is None else str(r.prompt_tokens)
        per_row = "-" if not r.prompt_tokens else f"{r.prefill_ms / r.prompt_tokens:.2f}"
        spreads = [s for s in (r.prefill, r.total) if s is not None]
        flagged = flagged or any(s.wide for s in spreads)
        pre90 = "-" if r.prefill is None else f"{r.prefill.p90:.1f}"
        tot90 = "-" if r.total is None else f"{r.total.p90:.1f}"
        lines.append(
            f"| {r.scale} | {r.encode_ms:.1f} | {r.prefill_ms:.1f} | {r.decode_ms:.1f} | {r.new_tokens:.1f} "
            f"| {r.total_ms:.1f} | {r.prefill_ms / full.prefill_ms:.2f}x | {r.total_ms / full.total_ms:.2f}x "
            f"| {per_token} | {prompt} | {per_row} | {pre90} | {tot90} | {spread_cell(*spreads)} |"
        )
    what = f"ms per item: p50 of {runs} timed run(s) per scale, interleaved, after warm-up" if runs else "ms per item"
    lines += ["", spread_note(flagged, what)]
    return "\n".join(lines)


def _per_item(row: ThroughputRow) -> tuple[str, str, str]:
    """The ms/item p50 and p90 cells of a throughput row (over its batches or images) and its spread."""
    if row.per_item is None or not row.per_item.n:
        return "-", "-", "-"
    return f"{row.per_item.p50:.1f}", f"{row.per_item.p90:.1f}", spread_cell(row.per_item)


def format_throughput(rows: Sequence[ThroughputRow], baseline: ThroughputRow, backend: Backend,
                      baseline_name: str = "naive", tokens: bool = False) -> str:
    """Items/s of each run and its ratio to ``baseline`` (with ``tokens``, the new tokens per answer too), then
    the p50 / p90 of its ms per item over its batches (one-by-one loops: over its images)."""
    extra, rule = (" new tokens/answer |", "---:|") if tokens else ("", "")
    lines = [_model_line(backend), "",
             f"| run | items | seconds | items/s | vs {baseline_name} |{extra} ms/item p50 | ms/item p90 | spread |",
             f"|---|---:|---:|---:|---:|{rule}---:|---:|---|"]
    flagged = False
    for r in rows:
        cell = (" - |" if r.new_tokens is None else f" {r.new_tokens:.1f} |") if tokens else ""
        p50, p90, spread = _per_item(r)
        flagged = flagged or (r.per_item is not None and r.per_item.wide)
        lines.append(f"| {r.label} | {r.items} | {r.seconds:.1f} | {r.items_per_s:.2f} "
                     f"| {r.items_per_s / baseline.items_per_s:.2f}x |{cell} {p50} | {p90} | {spread} |")
    lines += ["", spread_note(flagged, "ms/item: over each run's batches (a one-by-one loop: its images); every "
                                       "run had an untimed warm-up")]
    return "\n".join(lines)


def format_gguf(report: GgufComparison) -> str:
    """The GGUF pair and HF model compared, then their throughput against the stock handler."""
    head = f"GGUF `{report.gguf_path}` + `{report.mmproj_path}`; HF `{report.hf_dir}`"
    table = format_throughput(report.rows, report.rows[0], report.backend, baseline_name="stock handler")
    return f"{head}\n\n{table}"


def format_escalation(t: EscalationTiming, backend: Backend) -> str:
    """--auto-scale time per item against one fixed pass at the final scale (means), then each side's p50 / p90."""
    auto, fixed = t.auto, t.fixed
    cells = [f"{auto.p50:.1f} | {auto.p90:.1f}" if auto else "- | -", f"{fixed.p50:.1f} | {fixed.p90:.1f}" if fixed
             else "- | -"]
    spreads = [s for s in (auto, fixed) if s is not None]
    note = spread_note(any(s.wide for s in spreads), "ms per item over the items, each timed alone after a warm-up")
    return (f"{_model_line(backend)}\n\n"
            "| items | auto-scale ms/item | fixed pass at final scale ms/item | ratio | mean tokens | mean rungs "
            "| auto p50 | auto p90 | fixed p50 | fixed p90 | spread |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {t.items} | {t.auto_ms:.1f} | {t.fixed_ms:.1f} | {t.ratio:.2f}x | {t.mean_tokens:.1f} "
            f"| {t.mean_rungs:.2f} | {cells[0]} | {cells[1]} | {spread_cell(*spreads)} |\n\n{note}")


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



def _spread(s: Spread) -> str:
    digits = 1 if s.high < 100 else 0
    return f"{s.median:.{digits}f} [{s.low:.{digits}f}-{s.high:.{digits}f}]"


def _fraction(scale: float | None) -> str:
    return "1" if scale is None else f"1/{round(1 / scale)}"


def format_decode(report: DecodeReport) -> str:
    """Default decoding against --fast-decode per JPEG and preprocessing: median [min-max] ms, speed-up, and
    how far the normalised pixels moved."""
    import PIL
    from PIL import features

    turbo = features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None
    jpeg = f"libjpeg-turbo {turbo}" if turbo else "libjpeg"

    def load(avg: tuple[float, float, float] | None) -> str:
        return "unknown" if avg is None else " / ".join(f"{x:.1f}" for x in avg)

    lines = [f"Pillow {PIL.__version__} ({jpeg}); {report.machine}; load average (1 / 5 / 15 min) "
             f"{load(report.load_before)} at the start, {load(report.load_after)} at the end",
             "",
             "| JPEG | MB | preprocessing | crops | decode scale | default ms | `--fast-decode` ms | speed-up "
             "| max / mean abs difference | values changed |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        lines.append(f"| {r.width} x {r.height} | {r.file_bytes / 1e6:.2f} | {r.preprocessing} | {r.crops} "
                     f"| {_fraction(r.decode_scale)} | {_spread(r.exact)} | {_spread(r.fast)} | {r.speedup:.1f}x "
                     f"| {r.max_abs:.3f} / {r.mean_abs:.4f} | {100 * r.changed:.1f}% |")
    lines += ["", f"ms per image: `open_image` + the family's crops (CLIP ViT-L/14 at 336 px; NeXT with "
              f"LLaVA-1.6's pinpoints), median [min-max] of {report.repeat} timed run(s) after {report.warm_up} "
              "warm-up run(s) of each path, default and --fast-decode interleaved; speed-up of the medians. "
              "Differences over the normalised pixels of every crop (one uint8 level is about 0.015 there). "
              "JPEGs: synthetic, quality 90, written for the run."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --shape runs (random-weight paper-scale models)
# ---------------------------------------------------------------------------------------------
def format_amdahl(sweep: Sequence[ScaleRun]) -> str:
    """For each scale: the measured batch speed-up over 576 against the Amdahl bound from the same run's
    stage times, (encode + LM at 576) / (encode + LM at s); the achieved share of the bound is what the
    engine (image decoding, batching, tokenising, rows) keeps of the pooling win."""
    full = next((r for r in sweep if r.scale == 576), None)
    if full is None:
        return "(no Amdahl view: --tokens did not include 576)"
    # the encode does not depend on the scale: one mean over every run keeps run-to-run noise out of the bound
    encode = sum(r.encode_ms for r in sweep) / len(sweep)
    lines = ["| tokens | encode ms/item | LM ms/item | wall ms/item | speed-up vs 576 | Amdahl bound "
             "| achieved / bound |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sweep:
        speedup = r.row.items_per_s / full.row.items_per_s
        bound = (encode + full.lm_ms) / (encode + r.lm_ms) if encode + r.lm_ms > 0 else float("nan")
        wall = 1000 * r.row.seconds / r.row.items
        lines.append(f"| {r.scale} | {r.encode_ms:.0f} | {r.lm_ms:.0f} | {wall:.0f} | {speedup:.2f}x | {bound:.2f}x "
                     f"| {100 * speedup / bound:.0f}% |")
    lines.append(f"\nBound = (E + LM at 576) / (E + LM at s), E = {encode:.0f} ms/item (the mean encode of all "
                 "runs); achieved / bound is the share of the pooling win the whole engine keeps.")
    return "\n".join(lines)


def format_shape_latency(rows: Sequence[LatencyRow], backend: Backend, run: ShapeRun) -> str:
    """The latency table of a shape run under its heading."""
    return f"{run.heading()}\n\n{format_latency_table(rows, backend)}"


def format_shape_batch(report: ShapeBatchReport) -> str:
    """Throughput of every scale against the naive loop, then the Amdahl view."""
    rows = ([report.naive] if report.naive else []) + [r.row for r in report.sweep]
    base_name = "naive" if report.naive else "576"
    base = report.naive or next((r.row for r in report.sweep if r.scale == 576), rows[0])
    naive_note = ("" if not report.naive else
                  f"\nNaive loop: stock `processor(...)` + `model.generate(pixel_values=...)` on the untouched "
                  f"model (all tower layers), one image at a time, `min_new_tokens={report.run.max_new_tokens}`; "
                  f"timed over {report.naive.items} item(s).")
    return (f"{report.run.heading()}\n\n{format_throughput(rows, base, report.backend, base_name, tokens=True)}"
            f"\n{naive_note}\n\nAmdahl view (stage times from the rows of the same runs, batch "
            f"{report.batch_size}):\n\n{format_amdahl(report.sweep)}")


def format_shape_escalation(t: EscalationTiming, backend: Backend, run: ShapeRun, threshold: float | None,
                            ladder: Sequence[int] | None) -> str:
    """The escalation table of a shape run; random weights make the confidences (hence the rungs) arbitrary."""
    from m3cli.matryoshka.policy import DEFAULT_THRESHOLD

    rungs = ",".join(str(x) for x in sorted(ladder)) if ladder else "every scale"
    note = (f"Ladder {rungs}, threshold {DEFAULT_THRESHOLD if threshold is None else threshold}. Random weights "
            "give near-uniform next-token distributions, so confidences are tiny and items climb to the top "
            "rung: the ratio is the cost of the rungs below it (use --ladder 9,576 for one failed rung).")
    return f"{run.heading()}\n\n{format_escalation(t, backend)}\n\n{note}"


def format_shape_gguf(report: ShapeGgufReport) -> str:
    """The GGUF pair, how it was made, and its throughput against the stock handler."""
    head = (f"{report.run.heading()}\nGGUF `{report.gguf_path}` ({report.quant}) + `{report.mmproj_path}` (f16); "
            f"{'; '.join(report.notes)}. New tokens are counted, not assumed: the stock rows mask EOS in a logits "
            "processor (the handler may sample one token more when the text ends inside a UTF-8 character); our "
            "backend's loop stops at end-of-generation tokens, which random weights rarely pick.")
    table = format_throughput(report.rows, report.rows[0], report.backend, baseline_name="stock handler",
                              tokens=True)
    return f"{head}\n\n{table}"


def format_profile(run: ShapeRun, rates: Sequence[MatmulRate], timings: Sequence[LayerTiming],
                   bandwidth: float) -> str:
    """The matmul rate by row count, the decoder layers' share of prefill and decode, and the bandwidth."""
    lines = [run.heading(), "", "`F.linear` of the LM's up projection (rows x hidden) x (hidden x FF), best of 3:", "",
             "| rows | dtype | ms | GFLOP/s |", "|---:|---|---:|---:|"]
    lines += [f"| {r.rows} | {r.dtype} | {r.ms:.1f} | {r.gflops:.0f} |" for r in rates]
    lines += ["", "Decoder layers timed by forward hooks (the rest of a forward is embedding, image merge, final "
              "norm, LM head and glue):", "",
              "| forward | LM rows | forward ms | decoder layers ms | ms/layer | layers' share | GFLOP/s | GB/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        share = f"{100 * t.layers_ms / t.total_ms:.0f}%" if t.total_ms > 0 else "-"
        lines.append(f"| {t.label} | {t.rows} | {t.total_ms:.1f} | {t.layers_ms:.1f} | {t.layer_ms:.1f} | {share} "
                     f"| {t.gflops:.0f} | {t.gbps:.1f} |")
    lines += ["", f"Copy bandwidth (read + write) of a 512 MiB tensor: {bandwidth:.1f} GB/s (a decode step reads "
              "every weight once: GB/s near this is memory-bound)."]
    return "\n".join(lines)


def format_serve_cell(run: LoadRun) -> str:
    """One row of the load table (also printed as each cell finishes)."""
    spread = f"{min(run.rates):.2f}-{max(run.rates):.2f}" if run.rates else "-"
    tokens = f"{run.mean_completion:.1f}" if run.mean_completion is not None else "-"
    return (f"| {run.server} | {run.budget} | {run.concurrency} | {run.rate:.2f} ({spread}) | {run.latency(0.5):.0f} "
            f"| {run.latency(0.9):.0f} | {run.latency(0.99):.0f} | {tokens} | {run.failures} |")


SERVE_HEADER = ("| server | budget | concurrency | req/s median (min-max over passes) | p50 ms | p90 ms | p99 ms "
                "| new tokens | failed |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")


def format_serve(report: ServeReport, machine: str) -> str:
    """The load table, then the comparison: in-process m3 batch (torch) or llama-cpp-python's server (GGUF)."""
    from m3cli.bench.serve import M3, PEER

    lines = [f"m3 bench serve: model `{report.model}` ({report.backend}); {report.items} distinct scenes x "
             f"{report.repeat} timed passes per cell after a warm-up; max_tokens {report.max_new_tokens}; m3 serve "
             f"--max-batch {report.max_batch}; {machine}", *report.notes, "", SERVE_HEADER]
    lines += [format_serve_cell(r) for r in report.runs]
    c8 = 8 if any(r.concurrency == 8 for r in report.runs) else max(r.concurrency for r in report.runs)
    if report.batch_rows:
        lines += ["", f"HTTP overhead: m3 serve at concurrency {c8} against m3 batch's engine in-process on the same "
                  f"items (--batch-size {report.max_batch}):", "",
                  "| budget | m3 batch items/s | m3 serve req/s | serve / batch |", "|---|---:|---:|---:|"]
        for budget, row in report.batch_rows:
            cell = report.cell(M3, budget, c8)
            if cell is not None:
                lines.append(f"| {budget} | {row.items_per_s:.2f} | {cell.rate:.2f} | "
                             f"{cell.rate / row.items_per_s:.2f}x |")
    peer = report.cell(PEER, "576", c8)
    if peer is not None:
        lines += ["", f"Against {PEER} (llama-cpp-python's own server, the same GGUF pair, 576 tokens: its only "
                  f"setting), concurrency {c8}:", "", f"| m3 serve budget | m3 serve req/s | {PEER} req/s | ratio |",
                  "|---|---:|---:|---:|"]
        for r in report.runs:
            if r.server == M3 and r.concurrency == c8:
                lines.append(f"| {r.budget} | {r.rate:.2f} | {peer.rate:.2f} | {r.rate / peer.rate:.2f}x |")
        if report.agreement is not None:
            lines += ["", f"Answers at 576 that agree word for word with {PEER}'s: {100 * report.agreement:.0f}% "
                      "(its stock LLaVA encoder differs from m3's corrected one, docs/gguf.md; a speed comparison, "
                      "not equal answers)."]
    return "\n".join(lines)
