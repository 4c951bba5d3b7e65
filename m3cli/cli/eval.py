"""``m3 eval``: accuracy at every scale, the oracle and auto-scale, on the synthetic scenes or a data file."""

from __future__ import annotations

import json

import click

from m3cli.cli.app import command
from m3cli.cli.options import (
    INT_LIST,
    NonEmptyPath,
    NumberList,
    image_options,
    model_options,
    question_limit_option,
)
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
        click.option("--samples-format", type=click.Choice(["m3", "lmms-eval"]), default="m3", show_default=True,
                     help="--samples layout: m3's (one line per row) or lmms-eval's --log_samples (one line per "
                          "row and scale, 'tokens' naming the scale)."),
        click.option("--circular", is_flag=True,
                     help="--data: MMBench's CircularEval: ask each multiple-choice question once per rotation of "
                          "its options; it counts only when every rotation is right (the single pass is "
                          "reported too)."),
        click.option("--image-folder", default=None, type=NonEmptyPath(file_okay=False),
                     help="--data: relative image paths are under this folder (LLaVA's --image-folder) instead of "
                          "the data file's."),
        click.option("--answers-out", default=None, type=NonEmptyPath(dir_okay=False),
                     help="--data: write LLaVA answer files for LLaVA's scoring scripts, one per scale: FILE with "
                          "{tokens} replaced, else FILE-<tokens>.jsonl."),
        click.option("--resume", is_flag=True,
                     help="--data: keep the rows --samples FILE already holds (matched by content: inserted, "
                          "removed or reordered rows are evaluated once; a changed answer or image again)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing --samples, --json, --plot, --answers-out or --export-data file "
                          "(without it, samples are only completed with --resume, answer files only rewritten "
                          "with --resume, and a file m3 did not write is never touched)."),
        click.option("--retry-errors", is_flag=True, help="With --resume: evaluate the error rows again."),
        click.option("--encode-cache", type=click.IntRange(0, 100_000), default=64, show_default=True,
                     help="--data: encodings kept for rows about an image seen in an earlier batch."),
        click.option("--export-data", "export_dir", default=None, type=click.Path(file_okay=False),
                     help="Write the synthetic questions (--split, -n, --family) as DIR/<split>.jsonl + "
                          "DIR/images/*.png, for --data; loads no model."),
        click.option("--export-format", type=click.Choice(["jsonl", "mmbench", "llava"]), default="jsonl",
                     show_default=True,
                     help="--export-data layout: m3's JSONL, an MMBench TSV (DIR/<split>.tsv, images inside), or a "
                          "LLaVA question file (DIR/llava_<split>.jsonl + DIR/images)."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress on stderr (default: a bar on a terminal, else a line every $M3_PROGRESS_SECONDS "
                          "seconds, 30; --progress: the bar anyway)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@command("eval")
@model_options
@image_options
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
@click.option("--measure", default=None,
              help="Confidence measure of the escalation replay and the samples (default: the model's tuned "
                   "policy's, else sequence; m3 models lists them).")
@click.option("--tune", is_flag=True,
              help="Try every confidence measure and threshold; print the pick (fewest tokens within 1 point of "
                   "full-grid accuracy). Needs --auto-scale on the scenes.")
@click.option("--batch-size", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the full report as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write accuracy vs mean visual tokens as a PNG (needs matplotlib).")
@question_limit_option
@_data_options
def eval_cmd(scales, count, split, families, phrasing, drawn, auto_scale, thresholds, measure, tune, batch_size,
             json_path, plot_path, max_question_chars, data, metric, prompt_suffix, question_suffix, short_answer,
             max_new_tokens, samples_path, samples_format, circular, image_folder, answers_out, resume, overwrite,
             retry_errors, encode_cache, export_dir, export_format, progress, image_options, **model_kw):
    """Accuracy per question family and scale, with the oracle, on the synthetic scenes or --data rows.

    \b
    Examples:
      m3 eval --n 600 --split test --plot docs/img/accuracy.png
      m3 eval --auto-scale --thresholds 0.5,0.8,0.9,0.95 --split val
      m3 eval --export-data demo -n 60
      m3 eval --phrasing held-out --split test
      m3 eval --data demo/test.jsonl --plot acc.png --samples s.jsonl
      m3 eval --data mmbench_dev.tsv --model llava-v1.5-7b-m3 --circular --plot mmbench.png

    Every file it writes is checked before the model loads (its folder exists and takes a file; it is not an
    input; an existing one is replaced only with --overwrite, or --resume for samples and answer files). Exit
    code 0: the report is written; 1: nothing could be evaluated, or an output stopped taking lines part-way
    (what was written stays); 2: bad usage, data, model or output, before any work.
    """
    from m3cli.matryoshka.confidence import DEFAULT_MEASURE, MEASURES

    if measure is None:
        from m3cli.answering.defaults import model_policy

        tuned = model_policy(model_kw.get("model"))
        measure = (tuned.measure if tuned is not None else None) or DEFAULT_MEASURE
    if measure not in MEASURES:
        raise click.UsageError(f"--measure must be one of {', '.join(MEASURES)}")
    _check_flags(data, export_dir, split, auto_scale, tune, metric, prompt_suffix, question_suffix, short_answer,
                 samples_path, resume, retry_errors)
    if data and (phrasing or drawn):
        raise click.UsageError("--phrasing and --drawings pick synthetic questions; they do not go with --data")
    if overwrite and resume:
        raise click.UsageError("--overwrite replaces the --samples file and --resume completes it: give one of them")
    if not image_options.exact and not data:  # the scenes are drawn in memory: no file, no EXIF, no alpha
        raise click.UsageError("--upright, --alpha-background and --fast-decode need --data")
    _check_format_flags(data, export_dir, export_format, samples_path, samples_format, circular, image_folder,
                        answers_out)
    if export_dir:
        from m3cli.eval.format import is_eval_data
        from m3cli.eval.synthetic import export_path, export_scenes
        from m3cli.output import OutputFile

        OutputFile.check(export_path(export_dir, split or "test", export_format), "--export-data",
                         overwrite=overwrite, ours=is_eval_data, create_parent=True)
        path, n_rows, n_images = export_scenes(export_dir, split or "test", count or 600, list(families) or None,
                                               export_format, phrasing or "template", drawn)
        click.echo(f"wrote {n_rows} questions on {n_images} images: {path}")
        return
    # a bad source fails before the model loads
    rows = _read_rows(data, count, families, image_folder) if data else None
    if plot_path:
        _need_matplotlib()
    outputs = _check_outputs(data, json_path, plot_path, overwrite)  # before the model loads, too
    from m3cli.eval.benchmark import BenchOptions, samples_schema
    from m3cli.eval.datarun import DataOptions, open_samples

    opts = bench = None
    if rows is not None:
        opts = DataOptions([], metric=metric, prompt_suffix=prompt_suffix or None,
                           question_suffix=SHORT_ANSWER_SUFFIX if short_answer else question_suffix or None,
                           batch_size=batch_size, max_new_tokens=max_new_tokens or 16, measure=measure,
                           samples=samples_path, resume=resume, retry_errors=retry_errors, encode_cache=encode_cache,
                           overwrite=overwrite, max_question_chars=max_question_chars, image=image_options)
        inputs, folders = _data_inputs(data)
        bench = BenchOptions(circular=circular, answers_out=answers_out, samples_format=samples_format,
                             overwrite=overwrite, inputs=inputs, folders=folders)
        if answers_out:  # the files of the scales asked for (all of them are known only once the model loads)
            from m3cli.eval.llava_files import check_answers

            check_answers(answers_out, scales or None, overwrite=overwrite, resume=resume, inputs=inputs,
                          folders=folders)
    target = open_samples(opts, *_data_inputs(data), schema=samples_schema(samples_format)) if opts else None
    try:
        _run_eval(rows, opts, bench, target, outputs, scales, split, count, families, batch_size, max_new_tokens,
                  measure, thresholds if auto_scale or rows is not None else [], tune, data, progress, model_kw,
                  phrasing=phrasing or "template", drawn=drawn)
    finally:
        if target is not None:
            target.close()


def _data_inputs(data: str | None) -> tuple[list[str], list]:
    """What an eval run reads, for the output guard: the data files, and a data folder with what it picks."""
    import os

    from m3cli.eval.data import data_files, is_data_file

    if not data or data == "-":
        return [], []
    return data_files(data), [(data, is_data_file)] if os.path.isdir(data) else []


def _check_outputs(data, json_path, plot_path, overwrite: bool) -> dict:
    """The --json and --plot files, checked before any work (never a data file; never a file m3 did not
    write, unless --overwrite; never in a folder that does not exist)."""
    from m3cli.eval.format import is_our_plot, is_our_report
    from m3cli.output import OutputFile

    inputs, folders = _data_inputs(data)
    out = {}
    if json_path:
        out["json"] = OutputFile.check(json_path, "--json", overwrite=overwrite, ours=is_our_report, inputs=inputs,
                                       folders=folders)
    if plot_path:
        out["plot"] = OutputFile.check(plot_path, "--plot", overwrite=overwrite, ours=is_our_plot, inputs=inputs,
                                       folders=folders)
    return out


def _run_eval(rows, opts, bench, target, outputs, scales, split, count, families, batch_size, max_new_tokens,
              measure, levels, tune, data, progress, model_kw, phrasing: str = "template", drawn: bool = False) -> None:
    """Load the model, evaluate, print the tables and write the reports (the outputs were checked before)."""
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
                              phrasing=phrasing, drawn=drawn)
        else:
            from dataclasses import replace

            from m3cli.eval.benchmark import evaluate_benchmark

            result = evaluate_benchmark(backend, rows, replace(opts, scales=picked), bench, data, progress=bar,
                                        notes=lambda note: click.echo(f"m3: note: {note}", err=True), target=target)
            report = result.report
    finally:
        if bar is not None:
            bar.close()
    _show(report, result, backend, measure, levels, tune, outputs)


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


def _check_format_flags(data, export_dir, export_format, samples_path, samples_format, circular, image_folder,
                        answers_out) -> None:
    """The benchmark-layout flags: each needs --data (or --export-data) and what it works on."""
    data_only = {"--circular": circular, "--image-folder": image_folder is not None,
                 "--answers-out": answers_out is not None}
    used = [name for name, on in data_only.items() if on]
    if used and not data:
        raise click.UsageError(f"{', '.join(used)} need(s) --data")
    if samples_format != "m3" and not samples_path:
        raise click.UsageError("--samples-format needs --samples FILE")
    if export_format != "jsonl" and not export_dir:
        raise click.UsageError("--export-format goes with --export-data")


def _read_rows(source: str, count: int | None, families: tuple[str, ...], image_folder: str | None = None) -> list:
    """The data rows (first ``count``; only ``families`` if given)."""
    from m3cli.eval.data import EvalRow, read_eval_data

    rows = []
    for row in read_eval_data(source, image_folder=image_folder):
        if families and not (isinstance(row, EvalRow) and row.family in families):
            continue
        rows.append(row)
        if count is not None and len(rows) >= count:
            break
    if not rows:
        raise click.UsageError(f"{source}: no rows" + (" of the families asked for" if families else ""))
    return rows


def _show(report, result, backend, measure: str, levels: list[float], tune: bool, outputs: dict) -> None:
    """Print the tables; write --json and --plot (atomically, through the output guard; ``result``: the --data
    run's BenchResult, else None)."""
    from m3cli.eval.format import (
        benchmark_header,
        format_benchmark,
        format_calibration,
        format_errors,
        format_report,
        format_tuning,
        plot,
        report_dict,
    )
    from m3cli.eval.report import tune_escalation
    from m3cli.matryoshka.confidence import MEASURES

    if result is not None and not report.records:
        _show_unscored(result, backend, outputs)
        return
    escalations = [report.escalation(t, measure) for t in levels]
    column = result.column if result is not None else "family"
    click.echo(format_report(report, escalations, benchmark_header(result) if result else None, column))
    if result is not None:
        if extra := format_benchmark(result, column):
            click.echo(extra)
        click.echo(format_calibration(report, list(MEASURES)))
        if result.data.errors:
            click.echo(format_errors(result.data.errors))
        if result.answers:
            click.echo("\nanswers: " + ", ".join(result.answers))
    tuned = None
    if tune:
        rows, tuned = tune_escalation(report, list(MEASURES), levels)
        every = sorted(getattr(backend, "scales", report.scales))
        click.echo(format_tuning(rows, tuned, None if sorted(report.scales) == every else report.scales))
    if "json" in outputs:
        extra = {"model": backend.model_id, "backend": backend.name}
        if result is not None:
            extra |= result.data.summary() | result.summary()
        outputs["json"].write_text(_json_text(report_dict(report, escalations, tuned, measure, list(MEASURES),
                                                          **extra)))
    if "plot" in outputs:
        others = [("single pass", result.single)] if result is not None and result.single is not None else []
        with outputs["plot"].open("wb") as stream:
            plot(report, stream, escalations, others)


def _show_unscored(result, backend, outputs: dict) -> None:
    """A run whose rows have no gold answers (a test split): what was answered and written, no accuracy."""
    from m3cli.eval.format import benchmark_header, format_errors

    click.echo(benchmark_header(result))
    click.echo("\nno row has a gold answer: nothing to score (score the answers with the benchmark's own tools)")
    if result.data.errors:
        click.echo(format_errors(result.data.errors))
    if result.answers:
        click.echo("\nanswers: " + ", ".join(result.answers))
    if "json" in outputs:
        outputs["json"].write_text(_json_text({"model": backend.model_id, "backend": backend.name,
                                               "data": result.report.data, "n": 0, "scales": result.report.scales}
                                              | result.data.summary() | result.summary()))
    if "plot" in outputs:
        click.echo(f"m3 eval: --plot {outputs['plot'].name} not written: no scored rows", err=True)


def _json_text(data: dict) -> str:
    from m3cli.fileio import finite, json_default

    return json.dumps(finite(data), indent=2, default=json_default) + "\n"


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
    """The run's progress on stderr (:mod:`m3cli.output.progress`), or None with ``--no-progress``; the eval core
    calls it as ``bar(done, total)``."""
    from m3cli.output.progress import Progress, progress_mode

    mode = progress_mode(progress)
    return None if mode == "off" else Progress("m3 eval", unit="row", mode=mode)
