"""``m3 eval``: accuracy at every scale, the oracle and auto-scale, on the synthetic scenes or a data file."""

from __future__ import annotations

import json
import sys

import click

from m3cli.cli.app import command
from m3cli.cli.options import INT_LIST, NumberList, model_options
from m3cli.eval.scoring import CHOICE_SUFFIX, METRICS, SHORT_ANSWER_SUFFIX


def _data_options(fn):
    """--data and what goes with it: scoring, prompts, samples, resume."""
    options = [
        click.option("--data", "data", default=None, metavar="FILE|DIR|-",
                     help="Evaluate these rows (JSONL/CSV: image, question, answer | answers | choices+answer; "
                          "a folder of such files; - for stdin) instead of the scenes. See docs/eval-data.md."),
        click.option("--metric", type=click.Choice(METRICS), default=None,
                     help="--data: score every row this way (default: by its gold; answer -> exact, answers -> vqa, "
                          "choices -> choice)."),
        click.option("--prompt-suffix", default=CHOICE_SUFFIX, show_default=True,
                     help="--data: line after a multiple-choice question's options ('' for none)."),
        click.option("--question-suffix", default=None,
                     help="--data: line after an open question (default: none)."),
        click.option("--short-answer", is_flag=True,
                     help=f"--data: --question-suffix {SHORT_ANSWER_SUFFIX!r} (LLaVA's VQAv2/GQA prompt)."),
        click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=None,
                     help="Answer length cap (default: 4 on the scenes, 16 with --data)."),
        click.option("--samples", "samples_path", default=None, type=click.Path(dir_okay=False),
                     help="--data: write each row's answer, confidence and score at every scale (JSONL)."),
        click.option("--resume", is_flag=True, help="--data: keep the rows --samples FILE already holds."),
        click.option("--retry-errors", is_flag=True, help="With --resume: evaluate the error rows again."),
        click.option("--encode-cache", type=click.IntRange(0, 100_000), default=64, show_default=True,
                     help="--data: encodings kept for rows about an image seen in an earlier batch."),
        click.option("--export-data", "export_dir", default=None, type=click.Path(file_okay=False),
                     help="Write the synthetic questions (--split, -n, --family) as DIR/<split>.jsonl + "
                          "DIR/images/*.png, for --data; loads no model."),
        click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a TTY)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@command("eval")
@model_options
@click.option("--tokens", "scales", type=INT_LIST, default=None,
              help="Scales to evaluate, e.g. 1,9,36,144,576 (default: all).")
@click.option("-n", "--n", "count", type=click.IntRange(1, 10_000_000), default=None,
              help="Questions (scenes: balanced over the families, default 600; --data: the first N rows).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None, help="Scene split (default test).")
@click.option("--family", "families", multiple=True, help="Only these question families (repeatable).")
@click.option("--phrasing", type=click.Choice(["template", "train", "held-out"]), default=None,
              help="Scenes: ask each question in its template (default), in a training phrasing or in a phrasing "
                   "held out of training (docs/models.md).")
@click.option("--drawings", "drawn", is_flag=True,
              help="Scenes: ask about the split's drawings (48-512 px, larger shapes) instead of its 48 px scenes.")
@click.option("--auto-scale", is_flag=True,
              help="Also replay confidence escalation at each --thresholds value (always on with --data).")
@click.option("--thresholds", type=NumberList(float, 0.0, 1.0), default="0.5,0.8,0.9,0.95", show_default=True)
@click.option("--measure", default=None, help="Confidence measure (default: the tuned one).")
@click.option("--tune", is_flag=True,
              help="Try every confidence measure and threshold; print the pick (fewest tokens within 1 point of "
                   "full-grid accuracy). Needs --auto-scale on the scenes.")
@click.option("--batch-size", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the full report as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write accuracy vs mean visual tokens as a PNG (needs matplotlib).")
@_data_options
def eval_cmd(scales, count, split, families, phrasing, drawn, auto_scale, thresholds, measure, tune, batch_size,
             json_path, plot_path, data, metric, prompt_suffix, question_suffix, short_answer, max_new_tokens,
             samples_path, resume, retry_errors, encode_cache, export_dir, progress, **model_kw):
    """Accuracy per question family and scale, with the oracle, on the synthetic scenes or --data rows.

    \b
    Examples:
      m3 eval --n 600 --split test --plot docs/img/accuracy.png
      m3 eval --auto-scale --thresholds 0.5,0.8,0.9,0.95 --split val
      m3 eval --export-data demo -n 60
      m3 eval --phrasing held-out --split test
      m3 eval --data demo/test.jsonl --plot acc.png --samples s.jsonl
    """
    from m3cli.matryoshka.confidence import DEFAULT_MEASURE, MEASURES

    measure = measure or DEFAULT_MEASURE
    if measure not in MEASURES:
        raise click.UsageError(f"--measure must be one of {', '.join(MEASURES)}")
    _check_flags(data, export_dir, split, auto_scale, tune, metric, prompt_suffix, question_suffix, short_answer,
                 samples_path, resume, retry_errors)
    if data and (phrasing or drawn):
        raise click.UsageError("--phrasing and --drawings pick synthetic questions; they do not go with --data")
    if export_dir:
        from m3cli.eval.synthetic import export_scenes

        path, n_rows, n_images = export_scenes(export_dir, split or "test", count or 600, list(families) or None,
                                               phrasing or "template", drawn)
        click.echo(f"wrote {n_rows} questions on {n_images} images: {path}")
        return
    rows = _read_rows(data, count, families) if data else None  # a bad source fails before the model loads
    if plot_path:
        _need_matplotlib()
    from m3cli.backends import open_backend

    backend = open_backend(**model_kw)
    picked = _nested_scales(scales, backend.scales) or sorted(backend.scales)
    bar = _progress_bar(progress)
    try:
        if rows is None:
            from m3cli.eval.synthetic import evaluate

            result = None
            report = evaluate(backend, split=split or "test", n=count or 600, scales=picked,
                              families=list(families) or None, batch_size=batch_size,
                              max_new_tokens=max_new_tokens or 4, progress=bar,
                              phrasing=phrasing or "template", drawn=drawn)
        else:
            from m3cli.eval.datarun import DataOptions, evaluate_data

            opts = DataOptions(picked, metric=metric, prompt_suffix=prompt_suffix or None,
                               question_suffix=SHORT_ANSWER_SUFFIX if short_answer else question_suffix or None,
                               batch_size=batch_size, max_new_tokens=max_new_tokens or 16, measure=measure,
                               samples=samples_path, resume=resume, retry_errors=retry_errors,
                               encode_cache=encode_cache)
            result = evaluate_data(backend, rows, opts, data, progress=bar)
            report = result.report
    finally:
        if bar is not None:
            bar.close()
    _show(report, result, backend, measure, thresholds if auto_scale or rows is not None else [], tune,
          json_path, plot_path)


def _check_flags(data, export_dir, split, auto_scale, tune, metric, prompt_suffix, question_suffix, short_answer,
                 samples_path, resume, retry_errors) -> None:
    """Flags that cannot go together, refused before any work."""
    if data and export_dir:
        raise click.UsageError("--export-data writes the synthetic scenes; it does not go with --data")
    if data and split:
        raise click.UsageError("--split picks synthetic scenes; it does not go with --data")
    data_only = {"--metric": metric is not None, "--prompt-suffix": prompt_suffix != CHOICE_SUFFIX,
                 "--question-suffix": question_suffix is not None, "--short-answer": short_answer,
                 "--samples": samples_path is not None, "--resume": resume}
    used = [name for name, on in data_only.items() if on]
    if used and not data:
        raise click.UsageError(f"{', '.join(used)} need(s) --data")
    if short_answer and question_suffix is not None:
        raise click.UsageError("--short-answer is a --question-suffix: give one of them")
    if resume and not samples_path:
        raise click.UsageError("--resume needs --samples FILE (the checkpoint)")
    if retry_errors and not resume:
        raise click.UsageError("--retry-errors goes with --resume")
    if tune and not (auto_scale or data):
        raise click.UsageError("--tune goes with --auto-scale")


def _read_rows(source: str, count: int | None, families: tuple[str, ...]) -> list:
    """The data rows (first ``count``; only ``families`` if given)."""
    from m3cli.eval.data import EvalRow, read_eval_data

    rows = []
    for row in read_eval_data(source):
        if families and not (isinstance(row, EvalRow) and row.family in families):
            continue
        rows.append(row)
        if count is not None and len(rows) >= count:
            break
    if not rows:
        raise click.UsageError(f"{source}: no rows" + (" of the families asked for" if families else ""))
    return rows


def _show(report, result, backend, measure: str, levels: list[float], tune: bool, json_path, plot_path) -> None:
    """Print the tables; write --json and --plot."""
    from m3cli.eval.format import (
        data_header,
        format_calibration,
        format_errors,
        format_report,
        format_tuning,
        plot,
        report_dict,
    )
    from m3cli.eval.report import tune_escalation
    from m3cli.matryoshka.confidence import MEASURES

    escalations = [report.escalation(t, measure) for t in levels]
    click.echo(format_report(report, escalations, data_header(result) if result else None))
    if result is not None:
        click.echo(format_calibration(report, list(MEASURES)))
        if result.errors:
            click.echo(format_errors(result.errors))
    tuned = None
    if tune:
        rows, tuned = tune_escalation(report, list(MEASURES), levels)
        click.echo(format_tuning(rows, tuned))
    if json_path:
        extra = {"model": backend.model_id, "backend": backend.name}
        if result is not None:
            extra |= result.summary()
        _write_json(json_path, report_dict(report, escalations, tuned, measure, list(MEASURES), **extra))
    if plot_path:
        plot(report, plot_path, escalations)


def _write_json(path: str, data: dict) -> None:
    from m3cli.errors import OutputError, describe
    from m3cli.fileio import atomic_write_text, finite, json_default

    try:
        atomic_write_text(path, json.dumps(finite(data), indent=2, default=json_default) + "\n")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report ({describe(exc)})") from None


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install 'm3cli[plot]'") from None


def _nested_scales(picked: list[int] | None, valid: list[int]) -> list[int] | None:
    """--tokens checked against the model's scales (None or empty: all of them)."""
    if not picked:
        return None
    bad = [s for s in picked if s not in valid]
    if bad:
        raise click.UsageError(f"{bad} are not nested scales of this model ({', '.join(map(str, valid))})")
    return picked


def _progress_bar(progress: bool | None):
    """A tqdm bar on stderr (rows done, rate, ETA) when stderr is a terminal or --progress; else None.

    The core calls it as ``bar(done, total)``; ``bar.close()`` ends it.
    """
    if not (sys.stderr.isatty() if progress is None else progress):
        return None
    from tqdm import tqdm

    class _Bar:
        def __init__(self) -> None:
            self.bar = None

        def __call__(self, done: int, total: int) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total, desc="m3 eval", unit="row", file=sys.stderr, dynamic_ncols=True)
            self.bar.update(done - self.bar.n)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return _Bar()
