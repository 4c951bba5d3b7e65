"""``m3 eval``: accuracy at every visual-token scale, the oracle, escalation replay and calibration.

- ``report``: the records and what follows from them (accuracy, oracle, escalation replay, calibration);
- ``engine``: answering items at every scale with one encode per image (the bounded encode cache);
- ``synthetic``: the synthetic scenes as a source (the built-in evaluation, ``--export-data``);
- ``data``, ``fields`` and ``scoring``: ``--data`` files (JSONL / CSV / folder / stdin), their fields, and the
  benchmarks' scoring rules (VQA normalisation and accuracy, multiple choice);
- ``datarun`` and ``samples``: a ``--data`` run, the samples file and ``--resume``;
- ``format``: the tables and the plot.

No click and no printing here. This module imports nothing, so ``m3cli.cli`` stays light.
"""
