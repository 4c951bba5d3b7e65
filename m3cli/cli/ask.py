"""``m3 ask``: one question about one image."""

from __future__ import annotations

import json

import click

from m3cli.answering.defaults import DEFAULT_QUESTION
from m3cli.cli.app import command
from m3cli.cli.options import (
    check_policy_flags,
    check_run_question,
    image_options,
    max_visual_tokens_option,
    model_options,
    policy_options,
    question_limit_option,
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the answer text.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--server", envvar="M3_SERVER", default=None, metavar="URL",
              help="Ask a running m3 serve at URL (default: $M3_SERVER) instead of loading a model here; the same "
                   "answer, output and exit codes. Its --api-key goes in $M3_API_KEY.")
def ask(image, question, tokens, auto_scale, threshold, ladder, max_visual_tokens, max_question_chars, as_json,
        max_new_tokens, server, image_options, **model_kw):
    """``m3 ask``; its help text is ASK_HELP (it names the default question)."""
    from m3cli.fileio import text_safe
    from m3cli.matryoshka.scales import budget_note

    check_policy_flags(auto_scale, threshold, ladder)
    if question is None:
        question = DEFAULT_QUESTION
    elif not question.strip():
        raise click.UsageError("QUESTION is empty (leave it out to ask the default question)")
    check_run_question(question, max_question_chars)
    if server:
        _ask_server(server, image, question, tokens, auto_scale, threshold, ladder, max_visual_tokens, as_json,
                    max_new_tokens, image_options, model_kw)
        return
    from m3cli.answering.core import ask_images, make_policy
    from m3cli.backends import open_backend
    from m3cli.media import ImageNotes, open_image
    from m3cli.output import round_confidences

    picture = open_image(image, image_options)
    ImageNotes(lambda note: click.echo(f"m3: note: {note}", err=True)).see(picture.fields(), image)
    backend = open_backend(**model_kw)
    policy = make_policy(backend.grid_side, tokens, auto_scale, threshold, ladder, max_visual_tokens)
    note = budget_note(tokens, backend.grid_side)
    if note is not None:
        click.echo(f"m3: note: {note}", err=True)
    result = ask_images(backend, [picture.image], [question], [policy], max_new_tokens,
                        max_question_chars=max_question_chars)[0]
    if as_json:
        row = {"image": image, "question": question, **round_confidences(result.to_dict()), "note": result.note,
               "requested_tokens": tokens, "max_visual_tokens": max_visual_tokens, "model": backend.model_id,
               "backend": backend.name, **picture.fields()}
        click.echo(json.dumps(text_safe(row), ensure_ascii=False))
    else:
        click.echo(result.answer)
        if result.note:  # an empty answer is never a silent blank line
            click.echo(f"m3: note: {result.note}", err=True)


# what model_options leave at their defaults; with --server any other value would be silently ignored
_LOCAL_MODEL_DEFAULTS = {"backend": "auto", "device": "auto", "dtype": "auto"}


def _ask_server(server, image, question, tokens, auto_scale, threshold, ladder, max_visual_tokens, as_json,
                max_new_tokens, image_options, model_kw) -> None:
    """``m3 ask --server``: the question to a running ``m3 serve``; printed as a local answer is."""
    import os

    from m3cli.fileio import text_safe
    from m3cli.matryoshka.scales import budget_note
    from m3cli.server.client import ask_server

    local = [k for k, v in model_kw.items() if k != "model" and v != _LOCAL_MODEL_DEFAULTS.get(k)]
    if local:
        raise click.UsageError(f"--{local[0].replace('_', '-')} sets up a local model; with --server the server's "
                               "model answers (leave it out, or drop --server)")
    budget: dict = {"auto_scale": bool(auto_scale)}  # no flags: the full grid, as a local m3 ask
    if tokens is not None:
        budget["tokens"] = tokens
    if auto_scale:
        budget.update({k: v for k, v in (("threshold", threshold), ("ladder", ladder)) if v is not None})
    if max_visual_tokens is not None:
        budget["max_visual_tokens"] = max_visual_tokens
    budget.update(image_options.record())  # the server decodes the image: these tell it how
    served = ask_server(server, image, question, budget, max_new_tokens, model=model_kw.get("model"),
                        api_key=os.environ.get("M3_API_KEY") or None)
    note = budget_note(tokens, served.grid_side)
    if note is not None:
        click.echo(f"m3: note: {note}", err=True)
    row = served.row
    if as_json:
        out = {"image": image, "question": question, **served.result_fields(), "note": row.get("note"),
               "requested_tokens": tokens, "max_visual_tokens": max_visual_tokens, "model": row.get("model"),
               "backend": row.get("backend"), **{k: row.get(k) for k in ("upright", "alpha", "decode_scale")}}
        click.echo(json.dumps(text_safe(out), ensure_ascii=False))
    else:
        click.echo(row.get("answer") or "")
        if row.get("note"):
            click.echo(f"m3: note: {row['note']}", err=True)
