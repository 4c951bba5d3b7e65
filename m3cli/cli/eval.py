"""``m3 eval``: accuracy per question family and scale on the synthetic scenes."""

from __future__ import annotations

import json
import sys

import click

from m3cli.cli.app import command
from m3cli.cli.options import INT_LIST, NumberList, model_options


@command("eval")
@model_options
@click.option("--tokens", "scales", type=INT_LIST, default=None,
              help="Scales to evaluate, e.g. 1,9,36,144,576 (default: all).")
@click.option("-n", "--n", "count", type=click.IntRange(1, 1_000_000), default=600, show_default=True,
              help="Questions, balanced over the families.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--family", "families", multiple=True, help="Only these question families (repeatable).")
@click.option("--auto-scale", is_flag=True, help="Also replay confidence escalation at each --thresholds value.")
@click.option("--thresholds", type=NumberList(float, 0.0, 1.0), default="0.5,0.8,0.9,0.95", show_default=True)
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
    from m3cli.backends import open_backend
    from m3cli.confidence import DEFAULT_MEASURE, MEASURES
    from m3cli.evaluate import evaluate, format_report, plot

    measure = measure or DEFAULT_MEASURE
    if measure not in MEASURES:
        raise click.UsageError(f"--measure must be one of {', '.join(MEASURES)}")
    if plot_path:
        _need_matplotlib()
    backend = open_backend(**model_kw)
    picked = _nested_scales(scales, backend.scales)
    levels = thresholds if auto_scale else []
    report = evaluate(backend, split=split, n=count, scales=picked, families=list(families) or None,
                      batch_size=batch_size, progress=_progress_line("m3 eval"))
    escalations = [report.escalation(t, measure) for t in levels]
    click.echo(format_report(report, escalations))
    tuned = _tune(report, levels, auto_scale) if tune else None
    if json_path:
        data = report.to_dict() | {"model": backend.model_id, "backend": backend.name, "measure": measure,
                                   "escalation": escalations, "tuned": tuned,
                                   "calibration": [report.calibration(m, s) for m in MEASURES for s in report.scales]}
        with open(json_path, "w") as fh:
            json.dump(data, fh, indent=2)
    if plot_path:
        plot(report, plot_path, escalations)


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


def _tune(report, levels: list[float], auto_scale: bool) -> dict | None:
    """--tune: print every (measure, threshold) tried and return the pick."""
    from m3cli.bench.report import format_tuning
    from m3cli.confidence import MEASURES
    from m3cli.evaluate import tune_escalation

    if not auto_scale:
        raise click.UsageError("--tune goes with --auto-scale")
    rows, tuned = tune_escalation(report, list(MEASURES), levels)
    click.echo(format_tuning(rows, tuned))
    return tuned


def _progress_line(label: str):
    """A stderr progress line when stderr is a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        click.echo(f"\r{label}: {done}/{total}", err=True, nl=done >= total)

    return show
