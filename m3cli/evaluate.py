"""The evaluation's public names at their old address (the code lives in :mod:`m3cli.eval`)."""

from m3cli.eval.format import format_report, format_tuning, plot
from m3cli.eval.report import EvalReport, Record, normalise, tune_escalation
from m3cli.eval.synthetic import evaluate

__all__ = ["EvalReport", "Record", "evaluate", "format_report", "format_tuning", "normalise", "plot",
           "tune_escalation"]
