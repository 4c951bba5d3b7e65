"""m3 eval: the per-family/per-scale table, the oracle, calibration, escalation replay and the plot."""

import json

from click.testing import CliRunner

from m3cli.cli import cli
from m3cli.eval.report import EvalReport, Record, normalise


def _record(family, truth, answers, probs):
    import math

    return Record(family, "q", truth, answers, {s: [math.log(p)] for s, p in probs.items()},
                  {s: float(s) for s in answers}, encode_ms=10.0)


def test_normalise():
    assert normalise(" Red.") == "red"
    assert normalise("yes, it is") == "yes"
    assert normalise("") == ""


def test_oracle_and_escalation_replay():
    scales = [1, 9, 576]
    records = [
        _record("background", "red", {1: "red", 9: "red", 576: "red"}, {1: 0.9, 9: 0.9, 576: 0.9}),
        _record("letter", "k", {1: "a", 9: "k", 576: "k"}, {1: 0.3, 9: 0.95, 576: 0.99}),
        _record("letter", "m", {1: "a", 9: "b", 576: "c"}, {1: 0.3, 9: 0.3, 576: 0.3}),
    ]
    report = EvalReport("test", scales, records, 1.0, ["background", "letter"])
    assert report.accuracy(1) == 1 / 3 and report.accuracy(576) == 2 / 3
    assert report.accuracy(9, "letter") == 0.5
    oracle = report.oracle()
    assert oracle["accuracy"] == 2 / 3
    assert oracle["mean_tokens"] == (1 + 9 + 576) / 3  # never-right questions count at the top scale
    esc = report.escalation(0.8, "sequence")
    assert esc["accuracy"] == 2 / 3 and esc["mean_tokens"] == (1 + 9 + 576) / 3
    assert esc["mean_rungs"] == (1 + 2 + 3) / 3
    assert esc["ms_per_item"] == 10.0 + (1 + (1 + 9) + (1 + 9 + 576)) / 3
    cal = report.calibration("sequence", 1)
    assert 0 <= cal["ece"] <= 1


def test_eval_cli_table_json_plot(tiny_model_dir, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    res = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "-n", "12", "--tokens", "1,9,576",
                                   "--auto-scale", "--thresholds", "0.5,0.9", "--json", str(out_json),
                                   "--plot", str(out_png), "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    assert "| background |" in res.stdout and "**overall**" in res.stdout and "oracle:" in res.stdout
    assert "auto-scale t=0.9" in res.stdout
    data = json.loads(out_json.read_text())
    assert data["n"] == 12 and set(data["accuracy"]) == {"1", "9", "576"}
    assert set(data["by_family"]) == {"background", "exists", "count", "corner", "colour_of", "letter"}
    assert len(data["escalation"]) == 2 and data["calibration"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_eval_rejects_bad_scales(tiny_model_dir):
    res = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--tokens", "100"])
    assert res.exit_code == 2 and "not nested scales" in res.stderr


def test_tune_picks_fewest_tokens_within_tolerance():
    from m3cli.eval.report import tune_escalation

    scales = [1, 576]
    records = [_record("background", "red", {1: "red", 576: "red"}, {1: 0.95, 576: 0.99}),
               _record("letter", "k", {1: "a", 576: "k"}, {1: 0.6, 576: 0.99})]
    report = EvalReport("val", scales, records, 1.0, ["background", "letter"])
    rows, best = tune_escalation(report, ["sequence"], [0.5, 0.7, 0.99])
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 1.0]
    assert best["threshold"] == 0.7  # 0.99 is as accurate but tries more rungs for the same tokens
    assert best["mean_tokens"] == (1 + 576) / 2
