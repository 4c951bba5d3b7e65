"""``m3 batch`` (every image, frame or stdin row) and ``m3 merge`` (its shard outputs back into one)."""

from __future__ import annotations

import click

from m3cli.answering.defaults import DEFAULT_QUESTION
from m3cli.cli.app import command
from m3cli.cli.options import (
    NON_NEGATIVE,
    POSITIVE,
    SHARD,
    check_run_question,
    image_options,
    max_visual_tokens_option,
    model_options,
    policy_options,
    question_limit_option,
    resolve_policy,
)

BATCH_EXAMPLE = """
\b
Examples:
  m3 batch ./frames --auto-scale
  m3 batch ./photos -q "what colour is the background?" --tokens 9 -o answers.jsonl
  m3 batch clip.mp4 --fps 1 -q "how many shapes are there?" --auto-scale
  find . -name '*.png' | m3 batch - -q "is there a red shape?" --format csv
  jq -c '{image: .path, question: .q}' todo.jsonl | m3 batch - -o out.jsonl --resume
  m3 batch ./photos -q "what is the main object?" -q "is it indoors?" -o answers.jsonl
  m3 batch clip.mp4 --video-mode collage -q "what happens in this video?"
  m3 batch ./phone-photos --upright --alpha-background white -o answers.jsonl
  m3 batch requests.jsonl --input-format openai --format openai -o results.jsonl --resume
"""


def _layout(ctx, param, value):
    """``COLSxROWS`` -> (cols, rows)."""
    if value is None:
        return None
    cols, sep, rows = value.lower().partition("x")
    if not (sep and cols.isdigit() and rows.isdigit() and int(cols) >= 1 and int(rows) >= 1):
        raise click.BadParameter(f"expected COLSxROWS with whole numbers >= 1, e.g. 2x3; got {value!r}")
    return int(cols), int(rows)


def _run_options(fn):
    """Where rows go and how the run proceeds (resume, shards, video sampling, progress)."""
    options = [
        click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
                     help="Write rows here (default: stdout)."),
        click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "text", "openai"]), default="jsonl",
                     show_default=True,
                     help="openai: OpenAI Batch output lines (with --input-format openai; resumable)."),
        click.option("--input-format", type=click.Choice(["media", "openai"]), default="media", show_default=True,
                     help="media: files, folders, videos, stdin paths or JSONL rows; openai: OpenAI Batch request "
                          "files (JSONL lines {custom_id, method, url: /v1/chat/completions, body}), each request "
                          "with its own question and budget, as m3 serve takes them (see docs/serve.md)."),
        click.option("--resume", is_flag=True,
                     help="Skip items whose id already has a row in -o FILE (JSONL written by m3 batch with the "
                          "same model, question and budget)."),
        click.option("--retry-errors", is_flag=True,
                     help="With --resume: answer again the items whose row was an error."),
        click.option("--force", is_flag=True,
                     help="With --resume: append even to rows made with another model, question or budget."),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing -o FILE (without it, a file that holds rows is only completed with "
                          "--resume, and a file m3 did not write is never touched)."),
        click.option("-b", "--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True),
        click.option("--fps", type=POSITIVE, default=None,
                     help="Video: frames per second."),
        click.option("--every", type=click.IntRange(1), default=None, help="Video: every Nth frame."),
        click.option("--max-frames", type=click.IntRange(1), default=None,
                     help="Video: at most K frames (alone: K frames spread evenly; default 8)."),
        click.option("--video-mode", type=click.Choice(["frames", "collage"]), default="frames", show_default=True,
                     help="Video: frames: one row per sampled frame (--fps/--every/--max-frames, which a collage "
                          "refuses); collage: one row "
                          "per video, --collage-frames frames tiled into one image and the question prefixed with "
                          "the paper's \"The provided image arranges keyframes from a video in a grid view\" "
                          "(rows record your question, frame null, and the frame numbers in 'frames'). Images are "
                          "answered as images in both modes."),
        click.option("--collage-frames", type=click.IntRange(1, 64), default=6, show_default=True, metavar="K",
                     help="--video-mode collage: frames sampled uniformly (IG-VLM's: 0, s, 2s, ... with s = n//K)."),
        click.option("--collage-layout", default=None, metavar="COLSxROWS", callback=_layout,
                     help="--video-mode collage: the grid, filled row by row (default: round(sqrt(K)) columns, as "
                          "IG-VLM and the M3 paper: 2x3 for 6 frames)."),
        click.option("--encode-cache", type=click.IntRange(0, 100_000), default=16, show_default=True, metavar="N",
                     help="Encodings kept for questions about an image answered in an earlier batch (several -q, "
                          "stdin rows sharing an image); 0: shared within a batch only."),
        click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True),
        click.option("--progress/--no-progress", default=None,
                     help="Progress on stderr, with a total and ETA when the inputs are files and folders (default: "
                          "a bar on a terminal, else a line every $M3_PROGRESS_SECONDS seconds, 30; --progress: "
                          "the bar anyway)."),
        click.option("--shard", type=SHARD, default=None,
                     help="Answer only shard K of N (stable hash of the item id: its frames and questions stay in "
                          "one shard); needs -o FILE. Merge with m3 merge."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _engine_options(fn):
    """--engine and the Ray engine's knobs."""
    fn = click.option("--gpus-per-actor", type=NON_NEGATIVE, default=0.0, show_default=True,
                      help="--engine ray: GPUs per actor (1: one actor per GPU; 0: CPU inference).")(fn)
    fn = click.option("--actors", type=click.IntRange(1), default=1, show_default=True,
                      help="--engine ray: model replicas (answering actors).")(fn)
    fn = click.option("--ray-address", default=None, metavar="ADDR",
                      help="--engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:PORT; default: start a "
                           "local one).")(fn)
    fn = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                      help="local: this process; ray: a Ray cluster, one model per actor (pip install "
                           "'m3cli[ray]'; see docs/scale-out.md).")(fn)
    return fn


@command(epilog=BATCH_EXAMPLE)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-q", "--question", "questions", multiple=True, metavar="TEXT",
              help=f"The question for every item (default: {DEFAULT_QUESTION!r}; stdin JSONL rows may set their own). "
                   "Repeat for several questions: one row per item and question, ids ID#q1, ID#q2, ... in -q order, "
                   "each image decoded and encoded once for all of them.")
@policy_options
@max_visual_tokens_option
@question_limit_option
@image_options
@model_options
@_run_options
@_engine_options
def batch(inputs, questions, tokens, auto_scale, threshold, ladder, measure, on_miss, max_visual_tokens,
          max_question_chars, output, fmt, input_format, resume, retry_errors, force, overwrite, batch_size, fps,
          every, max_frames, video_mode, collage_frames, collage_layout, encode_cache, max_new_tokens, progress,
          shard, engine, ray_address, actors, gpus_per_actor, image_options,
          **model_kw):
    """Answer a question about every image, video frame or stdin row; one output row per item and question.

    INPUTS are files, folders (walked recursively, sorted) and videos; - reads stdin (paths, or JSONL
    rows with image/question/tokens/id). Without -q every item is asked "What is this?" (recorded in each
    row). With several -q every item without its own question is asked each, one row per question (id
    ID#q<k>, k in -q order); --resume and --shard work per row, and a shard keeps all questions of an
    image. An existing -o file is completed with --resume or replaced with --overwrite, never silently.
    Exit code 0: all items answered; 1: some rows have an error, or the output stopped taking rows (what was
    written stays; --resume completes it); 2: bad usage, model or output, before any work.
    """
    from m3cli.engines.job import BatchJob, run_job
    from m3cli.engines.units import BatchOptions

    for question in questions:
        check_run_question(question, max_question_chars)
    _, default = resolve_policy(model_kw.get("model"), tokens, auto_scale, threshold, ladder, measure, on_miss)
    opts = BatchOptions(
        question=questions[0] if questions else DEFAULT_QUESTION, questions=tuple(questions) if len(questions) > 1
        else (), tokens=tokens, auto_scale=auto_scale, threshold=threshold, ladder=ladder, measure=measure,
        on_miss=on_miss, default_policy=default,
        batch_size=batch_size, max_new_tokens=max_new_tokens, fps=fps, every=every, max_frames=max_frames,
        max_question_chars=max_question_chars, video_mode=video_mode, collage_frames=collage_frames,
        collage_layout=collage_layout, encode_cache=encode_cache, max_visual_tokens=max_visual_tokens,
        image=image_options,
    )
    result = run_job(BatchJob(
        list(inputs), opts, model=model_kw, output=output, fmt=fmt, resume=resume, retry_errors=retry_errors,
        force=force, overwrite=overwrite, shard=shard, engine=engine, ray_address=ray_address, actors=actors,
        gpus_per_actor=gpus_per_actor, progress=progress, input_format=input_format,
    ), notes=lambda note: click.echo(f"m3: note: {note}", err=True))
    for line in result.report():
        click.echo(f"m3 batch: {line}", err=True)
    raise SystemExit(result.exit_code)


@command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Merged JSONL (default: stdout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o FILE.")
def merge(files, output, overwrite):
    """Merge `m3 batch --shard K/N` outputs into one JSONL in input order.

    Reports duplicated and missing items; exit code 0 only when the shards cover the input exactly, 1 when
    something is missing (what there is is written, unless that is nothing), 2 before anything is written:
    shards of different runs, an -o that is one of the shards or already exists (--overwrite replaces it).
    An empty shard (one that got no items) is a valid shard.

    \b
    Example:
      m3 merge out/shard-*.jsonl -o all.jsonl
    """
    from m3cli.engines.shard import merge_outputs

    report = merge_outputs(list(files), output, overwrite=overwrite)  # MergeError, OutputError: one line, exit 2
    click.echo(f"m3 merge: {report.summary()}", err=True)
    raise SystemExit(0 if report.exact else 1)

