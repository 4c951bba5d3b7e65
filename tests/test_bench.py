"""m3 bench runs end to end on a tiny model (numbers are for users' machines, not asserted here)."""

from click.testing import CliRunner

from m3cli.cli import cli


def test_bench_latency_table(tiny_model_dir):
    res = CliRunner().invoke(cli, ["bench", "latency", "--model", str(tiny_model_dir), "--repeat", "1",
                                   "--tokens", "576,9,1", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["576", "9", "1"]
    assert rows[0].split("|")[7].strip() == "1.00x"


def test_bench_batch_and_escalation(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(cli, ["bench", "batch", "--model", str(tiny_model_dir), "-n", "3", "--batch-size", "2",
                                   "--max-new-tokens", "1", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "naive loop" in res.stdout and "--tokens 9" in res.stdout and "--auto-scale" in res.stdout
    res = CliRunner().invoke(cli, ["bench", "escalation", "--model", str(tiny_model_dir), "-n", "2"])
    assert res.exit_code == 0, res.output
    assert "ratio" in res.stdout
