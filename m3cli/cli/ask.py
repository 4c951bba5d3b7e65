"""``m3 ask``: one question about one image."""

from __future__ import annotations

import os

import click

from m3cli.answering.defaults import DEFAULT_QUESTION
from m3cli.cli.app import command
from m3cli.cli.options import (
    check_run_question,
    image_options,
    max_visual_tokens_option,
    model_options,
    policy_options,
    question_limit_option,
    resolve_policy,
)

ASK_EXAMPLE = """
\b
Examples:
  m3 ask models/examples/scene-0.png "what colour is the background?" --tokens 1
  m3 ask models/examples/scene-0.png --tokens 9
  m3 ask photo.jpg "What is this?" --tokens 9 --json
  m3 ask wide.jpg "What is this?" --model llava-next-vicuna-7b-m3 --max-visual-tokens 200
  m3 ask photo.jpg "How many people?" --auto-scale --threshold 0.9
  m3 ask phone.jpg "What is this?" --upright --alpha-background white
  m3 ask photo.jpg "What is this?" --tokens 9 --server http://127.0.0.1:8000   # a running m3 serve answers
"""


ASK_HELP = f"""Answer QUESTION about IMAGE using a budget of visual tokens.

QUESTION defaults to "{DEFAULT_QUESTION}".
"""


@command(help=ASK_HELP, epilog=ASK_EXAMPLE)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("question", required=False, default=None)
@policy_options
@max_visual_tokens_option
@question_limit_option
@image_options
@model_options
@click.option("--json", "as_json", is_flag=True,
              help="Print the result row (the schema of m3 batch's rows, docs/rows.md) instead of the answer text; "
                   "an item that fails is a row with its error (exit 1).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--server", envvar="M3_SERVER", default=None, metavar="URL",
              help="Ask a running m3 serve at URL (default: $M3_SERVER) instead of loading a model here; the same "
                   "answer, output and exit codes. Without policy flags the server's default policy answers. Its "
                   "--api-key goes in $M3_API_KEY.")
def ask(image, question, tokens, auto_scale, threshold, ladder, measure, on_miss, max_visual_tokens,
        max_question_chars, as_json, max_new_tokens, server, image_options, **model_kw):
    """``m3 ask``; its help text is ASK_HELP (it names the default question)."""
    from m3cli.matryoshka.scales import budget_note

    if question is None:
        question = DEFAULT_QUESTION
    elif not question.strip():
        raise click.UsageError("QUESTION is empty (leave it out to ask the default question)")
    check_run_question(question, max_question_chars)
    if server:
        _ask_server(server, image, question, tokens, auto_scale, threshold, ladder, measure, on_miss,
                    max_visual_tokens, as_json, max_new_tokens, image_options, model_kw)
        return
    from m3cli.answering.core import ask_images, policy_from_spec
    from m3cli.backends import open_backend
    from m3cli.engines.job import BatchJob, run_record
    from m3cli.engines.units import BatchOptions
    from m3cli.media import ImageNotes, open_image
    from m3cli.output import make_row

    spec, default = resolve_policy(model_kw.get("model"), tokens, auto_scale, threshold, ladder, measure, on_miss)
    # the record m3 batch writes in each row's `run` for the same question, model, policy and image options
    opts = BatchOptions(question=question, tokens=tokens, auto_scale=auto_scale, threshold=threshold, ladder=ladder,
                        measure=measure, on_miss=on_miss, default_policy=default, max_new_tokens=max_new_tokens,
                        max_visual_tokens=max_visual_tokens, image=image_options)
    record = run_record(BatchJob([image], opts, model=model_kw))
    picture = open_image(image, image_options)
    ImageNotes(lambda note: click.echo(f"m3: note: {note}", err=True)).see(picture.fields(), image)
    backend = open_backend(**model_kw)
    policy = policy_from_spec(backend.grid_side, spec, max_visual_tokens, default)
    note = budget_note(tokens, backend.grid_side)
    if note is not None:
        click.echo(f"m3: note: {note}", err=True)
    result = ask_images(backend, [picture.image], [question], [policy], max_new_tokens,
                        max_question_chars=max_question_chars, raise_errors=not as_json)[0]
    if as_json:
        row = make_row(id=os.path.normpath(image), source=image, question=question, **result.to_dict(),
                       note=result.note, model=backend.model_id, backend=backend.name, run=record,
                       **picture.fields())
        _print_row(row)
    else:
        click.echo(result.answer)
        if result.note:  # an empty answer is never a silent blank line
            click.echo(f"m3: note: {result.note}", err=True)


# what model_options leave at their defaults; with --server any other value would be silently ignored
_LOCAL_MODEL_DEFAULTS = {"backend": "auto", "device": "auto", "dtype": "auto"}


def _ask_server(server, image, question, tokens, auto_scale, threshold, ladder, measure, on_miss, max_visual_tokens,
                as_json, max_new_tokens, image_options, model_kw) -> None:
    """``m3 ask --server``: the question to a running ``m3 serve``; printed as a local answer is (``--json``: the
    server's row, which is the row a local ``m3 ask --json`` prints, with this file as its id and source)."""
    from m3cli.errors import ItemError
    from m3cli.matryoshka.scales import budget_note
    from m3cli.server.client import ask_server

    local = [k for k, v in model_kw.items() if k != "model" and v != _LOCAL_MODEL_DEFAULTS.get(k)]
    if local:
        raise click.UsageError(f"--{local[0].replace('_', '-')} sets up a local model; with --server the server's "
                               "model answers (leave it out, or drop --server)")
    knobs = {"threshold": threshold, "ladder": ladder, "measure": measure, "on_miss": on_miss}
    if not auto_scale and any(v is not None for v in knobs.values()):
        # a request states its escalation whole: the server's model policy is not known here
        raise click.UsageError("with --server, --threshold, --ladder, --measure and --on-miss need --auto-scale")
    budget: dict = {}  # only what the flags state: the rest is the server's default policy, as a request's
    if tokens is not None:
        budget["tokens"] = tokens
    if auto_scale:
        budget["auto_scale"] = True
        budget.update({k: v for k, v in knobs.items() if v is not None})
    if max_visual_tokens is not None:
        budget["max_visual_tokens"] = max_visual_tokens
    budget.update(image_options.record())  # the server decodes the image: these tell it how
    try:
        served = ask_server(server, image, question, budget, max_new_tokens, model=model_kw.get("model"),
                            api_key=os.environ.get("M3_API_KEY") or None)
    except ItemError as exc:  # answered with an error: --json prints its row, as a local m3 ask --json does
        failed = getattr(exc, "row", None)
        if not as_json or failed is None:
            raise
        _print_row(_local_row(failed, image))
        return
    note = budget_note(tokens, served.grid_side)
    if note is not None:
        click.echo(f"m3: note: {note}", err=True)
    row = served.row
    if as_json:
        _print_row(_local_row(row, image, served.wall_ms))
    else:
        click.echo(row.get("answer") or "")
        if row.get("note"):
            click.echo(f"m3: note: {row['note']}", err=True)


def _local_row(row: dict, image: str, wall_ms: float | None = None) -> dict:
    """A served row as local ``m3 ask --json`` prints it: this file as its ``id`` and ``source`` and, for an
    answer, the round trip as this client saw it as ``timings.wall_ms``."""
    from m3cli.output import ROW_KEYS, make_row

    fields = {k: v for k, v in row.items() if k in ROW_KEYS}
    timings = fields.get("timings")
    if isinstance(timings, dict) and wall_ms is not None:
        fields["timings"] = {**timings, "wall_ms": round(wall_ms, 3)}
    return make_row(**{**fields, "id": os.path.normpath(image), "source": image})


def _print_row(row: dict) -> None:
    """``--json``: the row on stdout; a row with an error also says it on stderr and exits 1."""
    from m3cli.fileio import dumps_row

    click.echo(dumps_row(row))
    if row.get("error") is not None:
        click.echo(f"m3: error: {row['error']}", err=True)
        raise SystemExit(1)
