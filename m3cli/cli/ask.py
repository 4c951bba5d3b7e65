"""``m3 ask``: one question about one image."""

from __future__ import annotations

import json

import click

from m3cli.cli.app import command
from m3cli.cli.options import check_policy_flags, model_options, policy_options

ASK_EXAMPLE = """
\b
Examples:
  m3 ask models/examples/scene-0.png "what colour is the background?" --tokens 1
  m3 ask photo.jpg "What is this?" --tokens 9 --json
  m3 ask photo.jpg "How many people?" --auto-scale --threshold 0.9
"""


@command(epilog=ASK_EXAMPLE)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("question")
@policy_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the answer text.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
def ask(image, question, tokens, auto_scale, threshold, ladder, as_json, max_new_tokens, **model_kw):
    """Answer QUESTION about IMAGE using a budget of visual tokens."""
    from m3cli.answering import ask_images, make_policy
    from m3cli.backends import open_backend
    from m3cli.media import load_image
    from m3cli.scales import budget_to_scale

    check_policy_flags(auto_scale, threshold, ladder)
    picture = load_image(image)
    backend = open_backend(**model_kw)
    policy = make_policy(backend.grid_side, tokens, auto_scale, threshold, ladder)
    budget = budget_to_scale(tokens, backend.grid_side) if tokens is not None else None
    if budget is not None and budget.rounded:
        click.echo(f"m3: note: --tokens {budget.requested} rounded down to {budget.scale}, the largest nested "
                   "scale <= it", err=True)
    result = ask_images(backend, [picture], [question], [policy], max_new_tokens)[0]
    if as_json:
        row = {"image": image, "question": question, **result.to_dict(), "requested_tokens": tokens,
               "model": backend.model_id, "backend": backend.name}
        click.echo(json.dumps(row, ensure_ascii=False))
    else:
        click.echo(result.answer)
