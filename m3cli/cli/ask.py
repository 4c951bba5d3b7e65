"""``m3 ask``: one question about one image."""

from __future__ import annotations

import os

import click

from m3cli.answering.defaults import DEFAULT_QUESTION
from m3cli.cli.app import command
from m3cli.cli.options import (
    check_run_question,
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
@model_options
@click.option("--json", "as_json", is_flag=True,
              help="Print the result row (the schema of m3 batch's rows, docs/rows.md) instead of the answer text; "
                   "an item that fails is a row with its error (exit 1).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
def ask(image, question, tokens, auto_scale, threshold, ladder, measure, on_miss, max_visual_tokens,
        max_question_chars, as_json, max_new_tokens, **model_kw):
    """``m3 ask``; its help text is ASK_HELP (it names the default question)."""
    from m3cli.answering.core import ask_images, policy_from_spec
    from m3cli.backends import open_backend
    from m3cli.engines.job import BatchJob, run_record
    from m3cli.engines.units import BatchOptions
    from m3cli.fileio import dumps_row
    from m3cli.matryoshka.scales import budget_note
    from m3cli.media import load_image
    from m3cli.output import make_row

    if question is None:
        question = DEFAULT_QUESTION
    elif not question.strip():
        raise click.UsageError("QUESTION is empty (leave it out to ask the default question)")
    check_run_question(question, max_question_chars)
    spec, default = resolve_policy(model_kw.get("model"), tokens, auto_scale, threshold, ladder, measure, on_miss)
    # the record m3 batch writes in each row's `run` for the same question, model and policy
    opts = BatchOptions(question=question, tokens=tokens, auto_scale=auto_scale, threshold=threshold, ladder=ladder,
                        measure=measure, on_miss=on_miss, default_policy=default, max_new_tokens=max_new_tokens,
                        max_visual_tokens=max_visual_tokens)
    record = run_record(BatchJob([image], opts, model=model_kw))
    picture = load_image(image)
    backend = open_backend(**model_kw)
    policy = policy_from_spec(backend.grid_side, spec, max_visual_tokens, default)
    note = budget_note(tokens, backend.grid_side)
    if note is not None:
        click.echo(f"m3: note: {note}", err=True)
    result = ask_images(backend, [picture], [question], [policy], max_new_tokens,
                        max_question_chars=max_question_chars, raise_errors=not as_json)[0]
    if as_json:
        row = make_row(id=os.path.normpath(image), source=image, question=question, **result.to_dict(),
                       note=result.note, model=backend.model_id, backend=backend.name, run=record)
        click.echo(dumps_row(row))
        if result.error is not None:
            click.echo(f"m3: error: {row['error']}", err=True)
            raise SystemExit(1)
    else:
        click.echo(result.answer)
        if result.note:  # an empty answer is never a silent blank line
            click.echo(f"m3: note: {result.note}", err=True)
