"""The ``m3`` command line: parse, call the core, print. Machine output on stdout, logs on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from m3cli import __version__
from m3cli.backends.base import ModelLoadError
from m3cli.convert.errors import ConvertError
from m3cli.registry import RegistryError
from m3cli.scales import BudgetError

# Errors that mean "bad input or model before any work": one line on stderr, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ModelLoadError, RegistryError, BudgetError, ConvertError)


def _train_errors():
    from m3cli.train.config import ConfigError
    from m3cli.train.trainer import TrainError

    return ConfigError, TrainError


def _media_error():
    from m3cli.media import MediaError

    return MediaError


def _engine_error():
    from m3cli.engines import EngineError

    return EngineError


class M3Group(click.Group):
    """A group whose every failure is one line on stderr with the documented exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            rv = exc.exit_code
        except click.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "m3"
            click.echo(f"{where}: error: {exc.format_message()}", err=True)
            rv = 2 if isinstance(exc, click.UsageError) else exc.exit_code
        except click.exceptions.Abort:
            click.echo("m3: interrupted", err=True)
            rv = 130
        except (*USER_ERRORS, _media_error(), _engine_error(), *_train_errors(), ValueError) as exc:
            from m3cli import logs

            if logs.verbosity() >= 2:  # -vv: the traceback too, for bug reports
                import traceback

                traceback.print_exc()
            click.echo(f"m3: error: {exc}", err=True)
            rv = 2
        if standalone_mode:
            sys.exit(rv or 0)
        return rv


@click.group(cls=M3Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="m3")
@click.option("-v", "--verbose", count=True, help="-v: info and third-party warnings; -vv: debug.")
def cli(verbose: int) -> None:
    """Budgeted visual question answering with Matryoshka Multimodal Models (M3).

    An image becomes a 24x24 grid of visual tokens; M3 pools it to 144, 36, 9 or 1 tokens,
    so each question buys only the visual detail it needs.
    """
    from m3cli import logs

    logs.configure(verbose)


def model_options(fn):
    """Options shared by every command that loads a model."""
    fn = click.option("--ctx", type=click.IntRange(64), default=None, help="GGUF: context length (default 2048).")(fn)
    fn = click.option("--mmproj-offload/--no-mmproj-offload", default=None,
                      help="GGUF: run the vision encoder on the GPU too (default: when the build has one).")(fn)
    fn = click.option("--n-gpu-layers", type=int, default=None,
                      help="GGUF: LM layers to offload (default: all when the build supports a GPU).")(fn)
    fn = click.option("--mmproj", type=click.Path(dir_okay=False), default=None,
                      help="GGUF: the vision projector file (default: a sibling *mmproj*.gguf).")(fn)
    fn = click.option("--threads", type=int, default=None, help="CPU threads for torch.")(fn)
    fn = click.option("--dtype", default="auto", show_default=True,
                      help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")(fn)
    fn = click.option("--backend", type=click.Choice(["auto", "torch", "llamacpp"]), default="auto",
                      show_default=True, help="Inference backend (auto: llamacpp for .gguf models, else torch).")(fn)
    fn = click.option("-m", "--model", default=None,
                      help="Registry name, model directory, .gguf file or hub id (default: the shipped m3-shapes).")(fn)
    return fn


def open_backend(model=None, backend="auto", **options):
    """Resolve the model name and load the backend (errors are one line, exit 2)."""
    from m3cli import logs
    from m3cli.backends import load_backend
    from m3cli.registry import resolve_model

    path = resolve_model(model)
    if backend == "llamacpp" or (backend == "auto" and path.lower().endswith(".gguf")):
        options["verbose"] = logs.verbosity() >= 1
    return load_backend(backend, path, **options)


def policy_options(fn):
    """--tokens / --auto-scale and their knobs."""
    fn = click.option("--ladder", default=None, help="Escalation rungs, e.g. 9,36,576 (default: every scale).")(fn)
    fn = click.option("--threshold", type=float, default=None,
                      help="Confidence needed to stop escalating (default: the model's tuned value).")(fn)
    fn = click.option("--auto-scale", is_flag=True,
                      help="Start at the smallest scale; escalate while confidence < threshold.")(fn)
    fn = click.option("-t", "--tokens", default=None,
                      help="Visual-token budget; rounded down to a nested scale (576/144/36/9/1).")(fn)
    return fn


def build_policy(grid: int, tokens, auto_scale: bool, threshold, ladder):
    """The policy and a note when the budget was rounded (None if not)."""
    from m3cli.policy import DEFAULT_THRESHOLD, Escalate, Fixed, make_ladder
    from m3cli.scales import budget_to_scale

    note = None
    if tokens is not None:
        budget = budget_to_scale(tokens, grid)
        if budget.rounded:
            note = f"--tokens {budget.requested} rounded down to {budget.scale}, the largest nested scale <= it"
    if auto_scale:
        rungs = _parse_ladder(ladder)
        return Escalate(make_ladder(grid, rungs, tokens), DEFAULT_THRESHOLD if threshold is None else threshold), note
    if ladder is not None or threshold is not None:
        raise click.UsageError("--ladder and --threshold need --auto-scale")
    return Fixed(budget_to_scale(tokens, grid).scale if tokens is not None else grid * grid), note


def _int_list(text: str, flag: str) -> list[int]:
    """``"1,9,36"`` -> ``[1, 9, 36]``; anything else is a usage error naming ``flag``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _parse_ladder(text):
    return None if text is None else _int_list(text, "--ladder")


ASK_EXAMPLE = """
\b
Examples:
  m3 ask models/examples/scene-0.png "what colour is the background?" --tokens 1
  m3 ask photo.jpg "What is this?" --tokens 9 --json
  m3 ask photo.jpg "How many people?" --auto-scale --threshold 0.9
"""


@cli.command(epilog=ASK_EXAMPLE)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("question")
@policy_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the answer text.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
def ask(image, question, tokens, auto_scale, threshold, ladder,
        as_json, max_new_tokens, **model_kw):
    """Answer QUESTION about IMAGE using a budget of visual tokens."""
    from m3cli.answering import ask_images
    from m3cli.media import load_image
    from m3cli.scales import parse_budget

    if tokens is not None:
        parse_budget(tokens)  # a bad budget is a usage error before the model loads
    picture = load_image(image)
    engine = open_backend(**model_kw)
    policy, note = build_policy(engine.grid_side, tokens, auto_scale, threshold, ladder)
    if note:
        click.echo(f"m3: note: {note}", err=True)
    result = ask_images(engine, [picture], [question], [policy], max_new_tokens)[0]
    if as_json:
        row = {"image": image, "question": question, **result.to_dict(),
               "requested_tokens": int(tokens) if tokens is not None else None,
               "model": engine.model_id, "backend": engine.name}
        click.echo(json.dumps(row, ensure_ascii=False))
    else:
        click.echo(result.answer)


BATCH_EXAMPLE = """
\b
Examples:
  m3 batch ./photos -q "what colour is the background?" --tokens 9 -o answers.jsonl
  m3 batch clip.mp4 --fps 1 -q "how many shapes are there?" --auto-scale
  find . -name '*.png' | m3 batch - -q "is there a red shape?" --format csv
  jq -c '{image: .path, question: .q}' todo.jsonl | m3 batch - -o out.jsonl --resume
"""


@cli.command(epilog=BATCH_EXAMPLE)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-q", "--question", default=None,
              help="The question for every item (stdin JSONL rows may set their own).")
@policy_options
@model_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write rows here (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "text"]), default="jsonl", show_default=True)
@click.option("--resume", is_flag=True, help="Skip items whose id already has a row in -o FILE (JSONL).")
@click.option("--retry-errors", is_flag=True, help="With --resume: answer again the items whose row was an error.")
@click.option("-b", "--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None, help="Video: frames per second.")
@click.option("--every", type=click.IntRange(1), default=None, help="Video: every Nth frame.")
@click.option("--max-frames", type=click.IntRange(1), default=None,
              help="Video: at most K frames (alone: K frames spread evenly; default 8).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a TTY).")
@click.option("--shard", "shard_spec", default=None, metavar="K/N",
              help="Answer only shard K of N (stable hash of the item id); needs -o FILE. Merge with m3 merge.")
@click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a Ray cluster, one model per actor (pip install 'm3cli[ray]'; "
                   "see docs/scale-out.md).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="--engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:PORT; default: start a local one).")
@click.option("--actors", type=click.IntRange(1), default=1, show_default=True,
              help="--engine ray: model replicas (answering actors).")
@click.option("--gpus-per-actor", type=click.FloatRange(0), default=0.0, show_default=True,
              help="--engine ray: GPUs per actor (1: one actor per GPU; 0: CPU inference).")
def batch(inputs, question, tokens, auto_scale, threshold, ladder, output, fmt,
          resume, retry_errors, batch_size, fps, every, max_frames, max_new_tokens, progress, shard_spec,
          engine_name, ray_address, actors, gpus_per_actor, **model_kw):
    """Answer a question about every image, video frame or stdin row; one output row per item.

    INPUTS are files, folders (walked recursively, sorted) and videos; - reads stdin (paths, or JSONL
    rows with image/question/tokens/id). Exit code 0: all items answered; 1: some rows have an error;
    2: bad usage or model, before any work.
    """
    from m3cli.media import iter_inputs
    from m3cli.output import OrderedWriter, Summary, open_sink, read_done_ids, read_error_ids
    from m3cli.policy import DEFAULT_THRESHOLD
    from m3cli.runner import BatchOptions, run_batch
    from m3cli.scales import parse_budget

    if tokens is not None:
        parse_budget(tokens)
    if fps is not None and every is not None:
        raise click.UsageError("--fps and --every cannot be combined")
    if resume and (not output or fmt != "jsonl"):
        raise click.UsageError("--resume needs -o FILE in jsonl format")
    shard = None
    if shard_spec is not None:
        from m3cli.shard import parse_shard

        try:
            shard = parse_shard(shard_spec)
        except ValueError as exc:
            raise click.UsageError(f"--shard: {exc}") from None
        if not output or fmt != "jsonl":
            raise click.UsageError("--shard needs -o FILE in jsonl format")
    if retry_errors and not resume:
        raise click.UsageError("--retry-errors goes with --resume")
    if not auto_scale and (ladder is not None or threshold is not None):
        raise click.UsageError("--ladder and --threshold need --auto-scale")
    if engine_name != "ray" and (ray_address is not None or actors != 1 or gpus_per_actor):
        raise click.UsageError("--ray-address, --actors and --gpus-per-actor go with --engine ray")
    if engine_name == "ray":
        from m3cli.engines.ray_engine import preflight

        preflight(model_kw, ray_address)  # EngineError (exit 2) before the output file is touched
    done = read_done_ids(output, retry_errors=retry_errors) if resume else set()
    # --engine ray loads the model in its actors only (they also check --ladder up front).
    engine = open_backend(**model_kw) if engine_name == "local" else None
    opts = BatchOptions(
        question=question, tokens=int(tokens) if tokens is not None else None, auto_scale=auto_scale,
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold, ladder=_parse_ladder(ladder),
        batch_size=batch_size, max_new_tokens=max_new_tokens, fps=fps, every=every, max_frames=max_frames,
        done_ids=done, failed_ids=read_error_ids(output) & done if resume else set(),
    )
    if opts.auto_scale and engine is not None:
        from m3cli.policy import make_ladder

        make_ladder(engine.grid_side, opts.ladder, opts.tokens)  # a bad ladder is a usage error up front
    items = iter_inputs(list(inputs))
    sink = open_sink(fmt, output, append=resume)
    selector = None
    if shard is not None:
        from m3cli.shard import IndexingSink, ShardSelector, write_sidecar

        k, n = shard
        selector = ShardSelector(items, k, n, on_end=lambda total: write_sidecar(output, k, n, total, False))
        items, sink = selector, IndexingSink(sink, selector)
    writer = OrderedWriter(sink)
    summary = Summary()
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(desc="m3 batch", unit="item", file=sys.stderr, dynamic_ncols=True)
    interrupted = False
    incomplete = None
    on_row = (lambda row: bar.update(1)) if bar is not None else None
    try:
        if engine_name == "ray":
            from m3cli.engines import EngineRunError
            from m3cli.engines.ray_engine import run_ray

            try:
                run_ray(model_kw, items, opts, writer, summary, ray_address, actors, gpus_per_actor, on_row=on_row)
            except EngineRunError as exc:
                incomplete = str(exc)
        else:
            run_batch(engine, items, opts, writer, summary, on_row=on_row)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        summary.stop()
    if selector is not None and not interrupted and not incomplete and selector.total is not None:
        write_sidecar(output, selector.k, selector.n, selector.total, True)
    if incomplete:
        click.echo(f"m3 batch: error: {incomplete}", err=True)
        click.echo(f"m3 batch: {summary.line()} (incomplete; rerun with --resume)", err=True)
        raise SystemExit(1)
    click.echo(f"m3 batch: {summary.line()}" + (" (interrupted; rerun with --resume)" if interrupted else ""),
               err=True)
    if interrupted:
        raise SystemExit(130)
    raise SystemExit(1 if summary.failed or summary.skipped_failed else 0)


@cli.group()
def bench():
    """Measure speed on your hardware (results go to docs/benchmarks.md)."""


@bench.command("latency")
@model_options
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="Image to use (default: a generated scene).")
@click.option("--tokens", "scales", default=None, help="Scales to time, e.g. 1,9,36,144,576 (default: all).")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=8, show_default=True)
def bench_latency(image, scales, repeat, batch_size, max_new_tokens, **model_kw):
    """Per-scale latency: encode / prefill / decode ms (medians) and the speed-up over 576 tokens."""
    from m3cli.bench import format_latency_table, latency_by_scale

    picked = _int_list(scales, "--tokens") if scales else None
    engine = open_backend(**model_kw)
    rows = latency_by_scale(engine, image_path=image, scales=picked, repeat=repeat,
                            batch_size=batch_size, max_new_tokens=max_new_tokens)
    click.echo(format_latency_table(rows, engine))


@cli.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Training YAML, e.g. models/m3-shapes.yaml.")
@click.option("-o", "--out", default=None, help="Run directory (default: runs/<config name>).")
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.option("--init", "init_from", default=None, type=click.Path(file_okay=False),
              help="Start from a saved model directory instead of random weights.")
@click.option("--stages", default=None, help="Run only these stages, e.g. m3 (default: all in the config).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a TTY).")
def train(config_path, out, resume, init_from, stages, threads, progress):
    """Train an M3 model with the staged recipe (vision, full-scale VQA, M3 nested loss).

    \b
    Example:
      m3 train --config models/m3-shapes.yaml --out runs/m3-shapes
      m3 train --config models/m3-shapes.yaml --out runs/m3-shapes --resume
    """

    from m3cli.train.config import load_config
    from m3cli.train.trainer import Progress, Trainer

    config = load_config(config_path)
    if threads:
        config.threads = threads
    run_dir = Path(out or Path("runs") / config.name)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _TrainBar(show)
    trainer = Trainer(config, run_dir, init=Path(init_from) if init_from else None, progress=Progress(bar.update))
    try:
        final = trainer.run(resume=resume, only=stages.split(",") if stages else None)
    finally:
        bar.close()
    click.echo(str(final))


class _TrainBar:
    """A tqdm bar per stage with the latest per-scale losses; a log line every 50 steps otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def update(self, stage: str, step: int, total: int, losses: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        if not self.enabled:
            if step % 50 == 0 or step == total:
                click.echo(f"m3 train: {stage} {step}/{total} {text}", err=True)
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, initial=step - 1, desc=stage, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command("eval")
@model_options
@click.option("--tokens", "scales", default=None, help="Scales to evaluate, e.g. 1,9,36,144,576 (default: all).")
@click.option("-n", "--n", "count", type=click.IntRange(1, 1_000_000), default=600, show_default=True,
              help="Questions, balanced over the families.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--family", "families", multiple=True, help="Only these question families (repeatable).")
@click.option("--auto-scale", is_flag=True, help="Also replay confidence escalation at each --thresholds value.")
@click.option("--thresholds", default="0.5,0.8,0.9,0.95", show_default=True)
@click.option("--measure", default=None, help="Confidence measure (default: the tuned one).")
@click.option("--tune", is_flag=True,
              help="With --auto-scale: try every confidence measure and threshold; print the pick (fewest tokens "
                   "within 1 point of full-grid accuracy).")
@click.option("--batch-size", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the full report as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write accuracy vs visual tokens as a PNG (needs matplotlib).")
def eval_cmd(scales, count, split, families, auto_scale, thresholds, measure, tune,
             batch_size, json_path, plot_path, **model_kw):
    """Accuracy per question family and scale on the synthetic scenes, with the oracle.

    \b
    Example:
      m3 eval --n 600 --split test --plot docs/img/accuracy.png
      m3 eval --auto-scale --thresholds 0.5,0.8,0.9,0.95 --split val
    """
    from m3cli.confidence import DEFAULT_MEASURE, MEASURES
    from m3cli.evaluate import evaluate, format_report, plot

    measure = measure or DEFAULT_MEASURE
    if measure not in MEASURES:
        raise click.UsageError(f"--measure must be one of {', '.join(MEASURES)}")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'm3cli[plot]'") from None
    engine = open_backend(**model_kw)
    picked = _parse_scales(scales, engine.scales)
    levels = _parse_thresholds(thresholds) if auto_scale else []
    report = evaluate(engine, split=split, n=count, scales=picked, families=list(families) or None,
                      batch_size=batch_size, progress=_progress_line("m3 eval"))
    escalations = [report.escalation(t, measure) for t in levels]
    click.echo(format_report(report, escalations))
    tuned = None
    if tune:
        from m3cli.evaluate import tune_escalation

        if not auto_scale:
            raise click.UsageError("--tune goes with --auto-scale")
        rows, tuned = tune_escalation(report, list(MEASURES), levels)
        click.echo("\n| measure | threshold | accuracy | mean tokens | mean rungs |\n|---|---:|---:|---:|---:|")
        for r in rows:
            click.echo(f"| {r['measure']} | {r['threshold']} | {100 * r['accuracy']:.1f} | {r['mean_tokens']:.1f} "
                       f"| {r['mean_rungs']:.2f} |")
        click.echo("\npick: " + (f"measure {tuned['measure']}, threshold {tuned['threshold']}" if tuned
                                 else "none within 1 point of full-grid accuracy"))
    if json_path:
        data = report.to_dict() | {"model": engine.model_id, "backend": engine.name, "measure": measure,
                                   "escalation": escalations, "tuned": tuned,
                                   "calibration": [report.calibration(m, s) for m in MEASURES for s in report.scales]}
        with open(json_path, "w") as fh:
            json.dump(data, fh, indent=2)
    if plot_path:
        plot(report, plot_path, escalations)


def _parse_scales(text, valid):
    if not text:
        return None
    picked = _int_list(text, "--tokens")
    bad = [s for s in picked if s not in valid]
    if bad:
        raise click.UsageError(f"{bad} are not nested scales of this model ({', '.join(map(str, valid))})")
    return picked


def _parse_thresholds(text):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise click.UsageError("--thresholds must lie in [0, 1]")
    return values


def _progress_line(label):
    """A stderr progress line when stderr is a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        click.echo(f"\r{label}: {done}/{total}", err=True, nl=done >= total)

    return show


@bench.command("batch")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--workdir", default="runs/bench-scenes", show_default=True, help="Where the scene PNGs are written.")
@click.option("--skip-naive", is_flag=True, help="Do not time the naive stock-generate loop.")
def bench_batch(count, batch_size, max_new_tokens, workdir, skip_naive, **model_kw):
    """Images/s of m3 batch (--tokens 9, 576 and --auto-scale) against a naive stock generate() loop."""
    from m3cli.bench import (
        BENCH_QUESTION,
        format_throughput,
        naive_generate_loop,
        runner_throughput,
        scene_files,
    )

    engine = open_backend(**model_kw)
    paths = scene_files(workdir, count)
    runner_throughput(engine, paths[:batch_size], BENCH_QUESTION, 9, batch_size, max_new_tokens)  # warm-up
    rows = []
    if not skip_naive:
        rows.append(naive_generate_loop(engine, paths, BENCH_QUESTION, max_new_tokens))
    rows.append(runner_throughput(engine, paths, BENCH_QUESTION, 576, batch_size, max_new_tokens))
    rows.append(runner_throughput(engine, paths, BENCH_QUESTION, 9, batch_size, max_new_tokens))
    rows.append(runner_throughput(engine, paths, BENCH_QUESTION, None, batch_size, max_new_tokens, auto_scale=True))
    click.echo(format_throughput(rows, rows[0], engine))


@bench.command("escalation")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=120, show_default=True)
@click.option("--threshold", type=float, default=None, help="Default: the tuned threshold.")
def bench_escalation(count, threshold, **model_kw):
    """--auto-scale time per item against one fixed pass at the scale where that item ended."""
    from m3cli.bench import escalation_overhead, machine_line

    engine = open_backend(**model_kw)
    t = escalation_overhead(engine, n=count, threshold=threshold)
    click.echo(f"model `{engine.model_id}`; {machine_line(engine)}\n\n"
               "| items | auto-scale ms/item | fixed pass at final scale ms/item | ratio | mean tokens | mean rungs |\n"
               "|---:|---:|---:|---:|---:|---:|\n"
               f"| {t.items} | {t.auto_ms:.1f} | {t.fixed_ms:.1f} | {t.ratio:.2f}x | {t.mean_tokens:.1f} "
               f"| {t.mean_rungs:.2f} |")


@bench.command("ray")
@model_options
@click.option("-n", "--n", "count", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--tokens", type=click.IntRange(1), default=9, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 512), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--actors", "actor_list", default="1,2", show_default=True, help="Actor counts to time, comma-separated.")
@click.option("--ray-address", default=None, help="Join this cluster instead of starting a local one.")
@click.option("--workdir", default="runs/bench-scenes", show_default=True, help="Where the scene PNGs are written.")
def bench_ray(count, tokens, batch_size, max_new_tokens, actor_list, ray_address, workdir, **model_kw):
    """Images/s of --engine ray with 1 and 2 actors against the single process; Ray start-up apart."""
    from m3cli.bench import format_scale_out, scale_out, scene_files
    from m3cli.engines.ray_engine import preflight

    actor_counts = _int_list(actor_list, "--actors")
    if not actor_counts or min(actor_counts) < 1:
        raise click.UsageError(f"--actors needs counts >= 1, got {actor_list!r}")
    preflight(model_kw, ray_address)  # the missing extra or a dead address: one line, before any model load
    engine = open_backend(**model_kw)
    paths = scene_files(workdir, count)
    report = scale_out(engine, model_kw, paths, tokens, batch_size, max_new_tokens, actor_counts, ray_address)
    click.echo(format_scale_out(report, engine, tokens, batch_size))


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
@click.option("--threads", type=int, default=None, help="CPU threads for every engine (default: all cores).")
@click.option("--workdir", default="runs/bench-gguf", show_default=True, help="Scenes and converted GGUF go here.")
def bench_gguf(model, gguf_path, mmproj, outtype, count, tokens, batch_size, max_new_tokens, threads, workdir):
    """Our llama.cpp backend at --tokens against stock Llava15ChatHandler at 576, and our torch backend."""
    from pathlib import Path

    from m3cli.bench import BENCH_QUESTION, format_throughput, runner_throughput, scene_files, stock_llava15_loop
    from m3cli.registry import resolve_model

    hf_dir = resolve_model(model)
    if hf_dir.lower().endswith(".gguf"):
        raise click.UsageError("--model is the HF model the GGUF pair was converted from; pass the .gguf as --gguf")
    if gguf_path is None:
        from m3cli.convert.gguf_writer import convert_to_gguf

        gguf_path, mmproj = convert_to_gguf(hf_dir, Path(workdir) / f"gguf-{outtype}", outtype)
    cpp = open_backend(str(gguf_path), backend="llamacpp", mmproj=mmproj, threads=threads, device="cpu",
                       n_gpu_layers=0)
    paths = scene_files(Path(workdir) / "scenes", count)
    rows = [stock_llava15_loop(gguf_path, cpp.mmproj_path, paths, BENCH_QUESTION, max_new_tokens, threads,
                               flash_attn=fa) for fa in (False, True)]
    runner_throughput(cpp, paths[:batch_size], BENCH_QUESTION, tokens, batch_size, max_new_tokens)  # warm-up
    for t in (576, tokens):
        rows.append(runner_throughput(cpp, paths, BENCH_QUESTION, t, batch_size, max_new_tokens,
                                      label=f"m3 batch --backend llamacpp --tokens {t}"))
    cpp.close()
    torch_engine = open_backend(hf_dir, backend="torch", device="cpu", threads=threads)
    runner_throughput(torch_engine, paths[:batch_size], BENCH_QUESTION, tokens, batch_size, max_new_tokens)
    rows.append(runner_throughput(torch_engine, paths, BENCH_QUESTION, tokens, batch_size, max_new_tokens,
                                  label=f"m3 batch --backend torch --tokens {tokens}"))
    click.echo(f"GGUF `{gguf_path}` + `{cpp.mmproj_path}`; HF `{hf_dir}`\n")
    click.echo(format_throughput(rows, rows[0], cpp, baseline_name="stock handler"))


@bench.command("memory")
@click.option("-m", "--model", default=None)
@click.option("--small", type=click.IntRange(1), default=50, show_default=True)
@click.option("--large", type=click.IntRange(1), default=5000, show_default=True)
@click.option("--workdir", default="runs/bench-scenes", show_default=True)
def bench_memory(model, small, large, workdir):
    """Peak RSS of m3 batch over a short and a long stream of items (memory must stay flat)."""
    from m3cli.bench import peak_rss_of_batch, scene_files

    paths = scene_files(workdir, 50)
    a = peak_rss_of_batch(model, paths, small)
    b = peak_rss_of_batch(model, paths, large)
    click.echo("| items | peak RSS MiB |\n|---:|---:|\n"
               f"| {small} | {a:.0f} |\n| {large} | {b:.0f} |\n\nratio {b / a:.3f} ({100 * (b / a - 1):+.1f}%)")


CONVERT_EXAMPLE = """
\b
Examples:
  m3 convert ~/ckpt/llava-v1.5-7b-m3 --to hf ~/models/llava-v1.5-7b-m3-hf
  m3 convert models/m3-shapes --to gguf ~/models/m3-shapes-gguf --outtype q8_0
  m3 convert --fix-mmproj mmproj-model-f16.gguf ~/models/fixed
"""


@cli.command(epilog=CONVERT_EXAMPLE)
@click.argument("src")
@click.argument("out")
@click.option("--to", "target", type=click.Choice(["hf", "gguf"]), default=None,
              help="hf: original-LLaVA checkpoint -> transformers layout; gguf: HF LLaVA -> LM + mmproj GGUF.")
@click.option("--fix-mmproj", is_flag=True, help="Rewrite a legacy llama.cpp LLaVA mmproj (SRC) into OUT dir.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="gguf: weight type of the language model (the mmproj stays f32, or f16 with f16).")
@click.option("--vision-tower", type=click.Path(file_okay=False), default=None,
              help="hf: local CLIP directory when the checkpoint does not carry its tower.")
@click.option("--dtype", default="auto", show_default=True, help="hf: auto (keep), float32, float16 or bfloat16.")
def convert(src, out, target, fix_mmproj, outtype, vision_tower, dtype):
    """Convert models: SRC --to hf OUT, SRC --to gguf OUT_DIR, or --fix-mmproj IN OUT_DIR."""
    from m3cli.convert.errors import ConvertError

    if fix_mmproj == (target is not None):
        raise click.UsageError("give exactly one of --to hf|gguf or --fix-mmproj")
    try:
        if fix_mmproj:
            from m3cli.convert.mmproj_fix import fix_mmproj as fix

            click.echo(str(fix(src, out)))
        elif target == "hf":
            from m3cli.convert.original_llava import convert_original_to_hf

            click.echo(str(convert_original_to_hf(src, out, dtype=dtype, vision_tower=vision_tower)))
        else:
            from m3cli.registry import resolve_model

            try:
                from m3cli.convert.gguf_writer import convert_to_gguf
            except ImportError as exc:
                raise click.UsageError(f"--to gguf needs the gguf extra: pip install 'm3cli[gguf]' ({exc})") from None
            lm, mmproj = convert_to_gguf(resolve_model(src) if not Path(src).exists() else src, out, outtype)
            click.echo(f"{lm}\n{mmproj}")
    except ConvertError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Merged JSONL (default: stdout).")
def merge(files, output):
    """Merge `m3 batch --shard K/N` outputs into one JSONL in input order.

    Reports duplicated and missing items; exit code 0 only when the shards cover the input exactly.

    \b
    Example:
      m3 merge out/shard-*.jsonl -o all.jsonl
    """
    from m3cli.shard import MergeError, merge_outputs

    try:
        report = merge_outputs(list(files), output)
    except MergeError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"m3 merge: {report.summary()}", err=True)
    raise SystemExit(0 if report.exact else 1)


@cli.command("models")
def list_models():
    """List the models in the registry (models/registry.yaml)."""
    from m3cli.registry import load_registry

    for entry in load_registry().values():
        click.echo(f"{entry.name}\t{entry.format}\t{entry.location}\t{entry.description}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="m3")


if __name__ == "__main__":
    main()
