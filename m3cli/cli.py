"""The ``m3`` command line: parse, call the core, print. Machine output on stdout, logs on stderr."""

from __future__ import annotations

import json
import sys

import click

from m3cli import __version__
from m3cli.backends.base import ModelLoadError
from m3cli.registry import RegistryError
from m3cli.scales import BudgetError

# Errors that mean "bad input or model before any work": one line on stderr, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ModelLoadError, RegistryError, BudgetError)


def _media_error():
    from m3cli.media import MediaError

    return MediaError


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
        except (*USER_ERRORS, _media_error(), ValueError) as exc:
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
    fn = click.option("--threads", type=int, default=None, help="CPU threads for torch.")(fn)
    fn = click.option("--dtype", default="auto", show_default=True,
                      help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")(fn)
    fn = click.option("--backend", type=click.Choice(["auto", "torch"]), default="auto", show_default=True,
                      help="Inference backend.")(fn)
    fn = click.option("-m", "--model", default=None,
                      help="Registry name, local model directory or hub id (default: the shipped m3-shapes).")(fn)
    return fn


def open_backend(model, backend, device, dtype, threads):
    """Resolve the model name and load the backend (errors are one line, exit 2)."""
    from m3cli.backends import load_backend
    from m3cli.registry import resolve_model

    return load_backend(backend, resolve_model(model), device=device, dtype=dtype, threads=threads)


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


def _parse_ladder(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"--ladder must be comma-separated integers, got {text!r}") from None


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
def ask(image, question, tokens, auto_scale, threshold, ladder, model, backend, device, dtype, threads,
        as_json, max_new_tokens):
    """Answer QUESTION about IMAGE using a budget of visual tokens."""
    from m3cli.answering import ask_images
    from m3cli.media import load_image
    from m3cli.scales import parse_budget

    if tokens is not None:
        parse_budget(tokens)  # a bad budget is a usage error before the model loads
    picture = load_image(image)
    engine = open_backend(model, backend, device, dtype, threads)
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
def bench_latency(model, backend, device, dtype, threads, image, scales, repeat, batch_size, max_new_tokens):
    """Per-scale latency: encode / prefill / decode ms (medians) and the speed-up over 576 tokens."""
    from m3cli.bench import format_latency_table, latency_by_scale

    engine = open_backend(model, backend, device, dtype, threads)
    picked = [int(s) for s in scales.split(",")] if scales else None
    rows = latency_by_scale(engine, image_path=image, scales=picked, repeat=repeat,
                            batch_size=batch_size, max_new_tokens=max_new_tokens)
    click.echo(format_latency_table(rows, engine))


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
