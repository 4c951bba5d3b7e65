"""``m3 serve``: the OpenAI-compatible server, the model loaded once, a visual-token budget per request."""

from __future__ import annotations

import click

from m3cli.cli.app import command
from m3cli.cli.options import (
    POSITIVE,
    image_options,
    max_visual_tokens_option,
    model_options,
    policy_options,
    question_limit_option,
    resolve_policy,
)

SERVE_EXAMPLE = """
\b
Examples:
  m3 serve                                   # the shipped model on http://127.0.0.1:8000/v1
  m3 serve --auto-scale --port 8001          # requests without a budget escalate over every scale
  m3 serve -m llava-v1.5-7b-m3 --tokens 36 --api-key secret --host 0.0.0.0
  m3 serve -m lm.gguf --mmproj mmproj.gguf --allowed-media-dir ./photos
\b
Then, from any OpenAI client (the budget per request in "m3", or "detail": low = 9, high = 576; without one,
the model's tuned policy under the flags given here):
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":
    "m3-shapes", "m3": {"tokens": 9}, "messages": [{"role": "user", "content": [{"type": "text",
    "text": "what colour is the background?"}, {"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}]}]}'
"""


@command(epilog=SERVE_EXAMPLE)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; use --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port, named in the ready line).")
@click.option("--api-key", envvar="M3_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (default: $M3_API_KEY; none: no key needed).")
@click.option("--served-model-name", default=None, metavar="NAME",
              help="The model name clients send and responses carry (default: the model's folder or file name).")
@policy_options
@max_visual_tokens_option
@question_limit_option
@model_options
@image_options
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Answer length of a request without max_tokens / max_completion_tokens.")
@click.option("--allowed-media-dir", "media_dirs", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Let requests name local image files (file:// or a path) inside DIR (repeatable; off by "
                   "default: only data: URLs).")
@click.option("--allow-remote-media", is_flag=True,
              help="Fetch http(s) image URLs (off by default: the server would fetch what callers name).")
@click.option("--remote-max-mb", type=POSITIVE, default=20.0, show_default=True,
              help="With --allow-remote-media: the largest image fetched.")
@click.option("--remote-timeout", type=POSITIVE, default=10.0, show_default=True,
              help="With --allow-remote-media: seconds a fetch may take.")
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Requests waiting for the model; beyond it a request gets 429 with Retry-After.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Queued requests answered together in one model batch.")
@click.option("--max-body-mb", type=POSITIVE, default=32.0, show_default=True,
              help="Largest request body (images travel inside it as data: URLs); beyond it a 413.")
@click.option("--request-timeout", type=POSITIVE, default=300.0, show_default=True,
              help="Seconds a request may wait for its answer; then 504 and its work is dropped.")
def serve(host, port, api_key, served_model_name, tokens, auto_scale, threshold, ladder, measure, on_miss,
          max_visual_tokens, max_question_chars, max_new_tokens, media_dirs, allow_remote_media, remote_max_mb,
          remote_timeout, max_queue, max_batch, max_body_mb, request_timeout, image_options, **model_kw):
    """Serve the model over the OpenAI chat-completions API, with a visual-token budget per request.

    POST /v1/chat/completions (stream: true too), GET /v1/models, GET /health. A request sets its budget
    with "m3": {"tokens": 9} / {"auto_scale": true, "threshold": 0.5} / {"max_visual_tokens": 200}, or an
    image's "detail" (low: 9 tokens per crop, high: 576); without either, the server's default policy: the
    policy flags given here over the model's tuned policy, as m3 ask without flags (what a budget leaves
    unstated comes from it too). Stops on SIGTERM or Ctrl-C after answering the requests in flight (exit 0).
    See docs/serve.md.
    """
    from m3cli import logs
    from m3cli.answering.chat_request import ChatDefaults
    from m3cli.server.run import serve as run_server
    from m3cli.server.settings import MB, ServerSettings

    _, default = resolve_policy(model_kw.get("model"), tokens, auto_scale, threshold, ladder, measure, on_miss)
    if not allow_remote_media and (remote_max_mb != 20.0 or remote_timeout != 10.0):
        raise click.UsageError("--remote-max-mb and --remote-timeout go with --allow-remote-media")
    defaults = ChatDefaults(tokens=tokens, auto_scale=auto_scale, threshold=threshold, ladder=ladder, measure=measure,
                            on_miss=on_miss, model_policy=default, max_visual_tokens=max_visual_tokens,
                            max_new_tokens=max_new_tokens, image=image_options)
    settings = ServerSettings(
        host=host, port=port, api_key=api_key, served_name=served_model_name, defaults=defaults,
        media_dirs=tuple(media_dirs), remote_media=allow_remote_media, remote_max_bytes=int(remote_max_mb * MB),
        remote_timeout_s=remote_timeout, max_queue=max_queue, max_batch=max_batch,
        max_body_bytes=int(max_body_mb * MB), request_timeout_s=request_timeout,
        max_question_chars=max_question_chars,
    )
    if not settings.loopback and api_key is None:
        click.echo(f"m3 serve: warning: listening on {host} without --api-key: anyone who can reach this port "
                   "can use the model", err=True)

    def ready(url: str, backend) -> None:
        click.echo(f"m3 serve: ready at {url}/v1 (model {backend.model_id}, {backend.name}; default policy "
                   f"{defaults.policy.flags()}); Ctrl-C or SIGTERM stops after the requests in flight", err=True)

    code = run_server(settings, model_kw, on_ready=ready, verbose=logs.verbosity() >= 1)
    click.echo("m3 serve: stopped", err=True)
    raise SystemExit(code)
