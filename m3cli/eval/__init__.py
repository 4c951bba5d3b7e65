"""``m3 eval``: accuracy at every visual-token scale, the oracle, escalation replay and calibration.

- ``report``: the records and what follows from them (accuracy, oracle, escalation replay, calibration);
- ``engine``: answering items at every scale with one encode per image (the bounded encode cache);
- ``synthetic``: the synthetic scenes as a source (the built-in evaluation, ``--export-data``);
- ``datarun`` and ``samples``: ``--data`` files, the samples file and ``--resume``;
- ``format``: the tables and the plot.

No click and no printing here.
"""

from m3cli.eval.report import EvalReport, Record, normalise, tune_escalation

__all__ = ["EvalReport", "Record", "normalise", "tune_escalation"]
