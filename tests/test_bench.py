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


def test_bench_latency_counts_tokens_and_prompt_rows(tiny_model_dir):
    res = CliRunner().invoke(cli, ["bench", "latency", "--model", str(tiny_model_dir), "--repeat", "1",
                                   "--tokens", "576,1", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if line.startswith("| tokens"))
    assert header.endswith("| decode ms/token | prompt tokens | prefill ms/row | prefill ms p90 | total ms p90 "
                           "| spread |")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in res.stdout.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert int(rows[0][9]) - int(rows[1][9]) == 575  # the same text around 576 and 1 visual tokens
    assert all(1.0 <= float(r[4]) <= 3.0 for r in rows)  # EOS counts as a generated token, the cap does not


def test_bench_escalation_ladder(tiny_model_dir):
    res = CliRunner().invoke(cli, ["bench", "escalation", "--model", str(tiny_model_dir), "-n", "2",
                                   "--ladder", "9,576", "--threshold", "1.0"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if line.startswith("| 2 "))
    assert row.split("|")[6].strip() == "2.00"  # threshold 1: both rungs, every item
    res = CliRunner().invoke(cli, ["bench", "escalation", "--model", str(tiny_model_dir), "--ladder", "10"])
    assert res.exit_code == 2 and "not nested scales" in res.output


def test_bench_decode_times_both_paths_and_measures_the_difference():
    res = CliRunner().invoke(cli, ["bench", "decode", "--sizes", "64x48,2016x2016", "--repeat", "1", "--warm-up", "0"])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if line.startswith("| JPEG"))
    assert "| default ms | `--fast-decode` ms | speed-up |" in header
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in res.stdout.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [(r[0], r[2]) for r in rows] == [(size, prep) for size in ("64 x 48", "2016 x 2016")
                                          for prep in ("LLaVA-1.5 pad", "LLaVA-1.5 crop", "LLaVA-NeXT anyres")]
    for r in rows:
        exact, fast = (float(cell.split(" [")[0]) for cell in (r[5], r[6]))
        assert exact > 0 and fast > 0 and r[7].endswith("x")
        max_abs = float(r[8].split(" / ")[0])
        if r[0] == "64 x 48":  # too small to reduce: the same pixels both ways
            assert r[4] == "1" and max_abs == 0 and r[9] == "0.0%"
        else:  # short side 2016: libjpeg decodes at 1/2, and the crops' pixels move
            assert r[4] == "1/2" and max_abs > 0 and float(r[9].rstrip("%")) > 0
    assert int(rows[2][3]) >= 3 and int(rows[5][3]) == 5  # NeXT: base crop + tiles


def test_bench_decode_refuses_bad_sizes():
    res = CliRunner().invoke(cli, ["bench", "decode", "--sizes", "4032by3024"])
    assert res.exit_code == 2 and "WxH" in res.output
    res = CliRunner().invoke(cli, ["bench", "decode", "--sizes", "20000x20000"])
    assert res.exit_code == 2 and "limit" in res.output
