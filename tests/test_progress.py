"""Progress on stderr (one mechanism for batch, eval and bench) and what bench tables state beside a figure."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from m3cli.bench.stats import SPREAD_LIMIT, Spread, cpu_model, percentile, spread_cell, spread_note
from m3cli.cli import cli
from m3cli.output.progress import Progress, clock, progress_mode


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- the mechanism --------------------------------------------------------------------------------------------------
def test_mode_is_a_bar_on_a_terminal_lines_elsewhere_and_off_on_request():
    assert progress_mode(None, Tty()) == "bar"
    assert progress_mode(None, io.StringIO()) == "log"
    assert progress_mode(True, io.StringIO()) == "bar"
    assert progress_mode(False, Tty()) == "off"


def test_lines_report_count_rate_and_eta_with_a_total():
    out = io.StringIO()
    bar = Progress("m3 eval", total=4, unit="row", mode="log", stream=out, interval=0)
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("m3 eval: 1/4 rows (25%), ") and "ETA " in lines[0] and "elapsed 0:00" in lines[0]
    assert lines[1].startswith("m3 eval: 2/4 rows (50%)")
    assert lines[-1].endswith("(end)") and len(lines) == 3


def test_lines_are_periodic_and_a_short_run_prints_none():
    out = io.StringIO()
    bar = Progress("m3 batch", mode="log", stream=out, interval=3600)
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""


def test_unknown_total_has_no_eta_and_a_late_total_is_taken():
    out = io.StringIO()
    bar = Progress("m3 batch", unit="row", mode="log", stream=out, interval=0)
    bar.update(2)
    bar.set_total(8)  # from the counting thread
    bar.update(1)
    first, second = out.getvalue().splitlines()
    assert first.startswith("m3 batch: 2 rows, ") and "ETA" not in first
    assert second.startswith("m3 batch: 3/8 rows (38%)") and "ETA" in second


def test_the_callback_form_sets_done_and_total():
    out = io.StringIO()
    bar = Progress("m3 eval", mode="log", stream=out, interval=0)
    bar(0, 10)
    bar(4, 10)
    bar(10, 10)
    assert bar.done == 10 and bar.total == 10
    assert out.getvalue().splitlines()[-1].startswith("m3 eval: 10/10 items (100%)")


def test_bar_mode_draws_a_tqdm_bar_with_its_total():
    out = Tty()
    with Progress("m3 batch", total=3, unit="row", mode="bar", stream=out) as bar:
        bar.update(3)
    assert "3/3" in out.getvalue() and "m3 batch" in out.getvalue()


def test_clock():
    assert [clock(s) for s in (0, 29.4, 725, 3723)] == ["0:00", "0:29", "12:05", "1:02:03"]


def test_batch_logs_progress_with_a_total_for_a_folder(tiny_model_dir, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (40 * i, 90, 90)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("skipped once, by the real walk only")
    monkeypatch.setenv("M3_PROGRESS_SECONDS", "0")
    res = CliRunner().invoke(cli, ["batch", str(folder), "-q", "q", "-q", "r", "--model", str(tiny_model_dir),
                                   "--tokens", "9", "--max-new-tokens", "1", "-b", "2"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("m3 batch: ") and "items (" in ln]
    assert lines[-1].startswith("m3 batch: 6/6 items (100%)"), res.stderr
    assert res.stderr.count("notes.txt") == 1  # the counting pass logs nothing
    assert len(res.stdout.splitlines()) == 6


def test_batch_from_stdin_has_no_total_and_no_progress_is_silent(tiny_model_dir, scene_png, monkeypatch):
    monkeypatch.setenv("M3_PROGRESS_SECONDS", "0")
    args = ["batch", "-", "-q", "q", "--model", str(tiny_model_dir), "--tokens", "9", "--max-new-tokens", "1"]
    res = CliRunner().invoke(cli, args, input=f"{scene_png}\n{scene_png}\n")
    lines = [ln for ln in res.stderr.splitlines() if "items, " in ln and ln.startswith("m3 batch: ")]
    assert lines and all("/" not in ln.split(",")[0] and "ETA" not in ln for ln in lines)
    res = CliRunner().invoke(cli, [*args, "--no-progress"], input=f"{scene_png}\n")
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m3 batch: done 1,")


def test_count_rows_leaves_out_resumed_rows_and_videos(tmp_path):
    from m3cli.engines.job import count_rows
    from m3cli.engines.units import BatchOptions

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    assert count_rows([str(tmp_path)], BatchOptions()) == 2
    assert count_rows([str(tmp_path)], BatchOptions(questions=("q", "r"))) == 4
    done = {str(tmp_path / "a.png") + "#q1"}
    assert count_rows([str(tmp_path)], BatchOptions(questions=("q", "r"), done_ids=done)) == 3
    (tmp_path / "c.mp4").write_bytes(b"x")
    assert count_rows([str(tmp_path)], BatchOptions()) is None  # frames of a video: known only once decoded
    assert count_rows([str(tmp_path)], BatchOptions(video_mode="collage")) == 3


def test_count_requests_of_openai_batch_files(tmp_path):
    from m3cli.engines.job import count_requests
    from m3cli.engines.units import BatchOptions

    lines = [json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions", "body": {}})
             for c in ("a", "b", "a")] + ["not json", ""]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert count_requests([str(path)], BatchOptions()) == 4  # one row per non-blank line, a bad one included
    assert count_requests([str(path)], BatchOptions(done_ids={"a", "a~2"})) == 2
    assert count_requests([str(tmp_path / "absent.jsonl")], BatchOptions()) is None


def test_eval_logs_progress_when_not_on_a_terminal(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("M3_PROGRESS_SECONDS", "0")
    res = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "-n", "6", "--tokens", "1,9",
                                   "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    assert "m3 eval: 6/6 rows (100%)" in res.stderr and "m3 eval: 3/6 rows (50%)" in res.stderr


# -- bench: spread and machine ---------------------------------------------------------------------------------------
def test_percentiles_interpolate_like_numpy():
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert percentile([7], 90) == 7


def test_a_wide_spread_is_flagged_and_said():
    calm = Spread.of([100, 101, 102, 103, 104])
    busy = Spread.of([100, 100, 100, 180, 400])
    assert not calm.wide and busy.wide and busy.ratio > SPREAD_LIMIT
    assert spread_cell(calm) == "+2%" and spread_cell(calm, busy).endswith("WIDE")
    assert spread_cell(Spread.of([5.0])) == "-" and not Spread.of([1, 9]).wide  # two runs: shown, never flagged
    assert "do not compare" in spread_note(True, "x") and "do not compare" not in spread_note(False, "x")


def test_cpu_model_reads_the_kernels_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example  CPU @ 2.0GHz\nflags\t: avx\n")
    assert cpu_model(str(info)) == "Example CPU @ 2.0GHz"
    assert cpu_model(str(tmp_path / "absent"))


def test_bench_tables_state_spread_and_machine_and_write_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["bench", "latency", "--model", str(tiny_model_dir), "--repeat", "3",
                                   "--tokens", "576,1", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    first = res.stdout.splitlines()[0]
    assert "CPU " in first and "cores" in first and "torch threads" in first and "device cpu" in first
    assert "p50 of 3 timed run(s) per scale, interleaved, after warm-up" in res.stdout
    res = CliRunner().invoke(cli, ["bench", "batch", "--model", str(tiny_model_dir), "-n", "4", "--batch-size", "2",
                                   "--max-new-tokens", "1", "--skip-naive"])
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("| m3 batch --tokens 9"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert float(cells[5]) > 0 and float(cells[6]) >= float(cells[5])  # ms/item p50 <= p90, over 2 batches
    assert list(tmp_path.iterdir()) == []  # no runs/bench-* folder left behind unasked


def test_bench_workdir_is_kept_and_named(tiny_model_dir, tmp_path):
    keep = tmp_path / "keep"
    res = CliRunner().invoke(cli, ["bench", "batch", "--model", str(tiny_model_dir), "-n", "2", "--batch-size", "2",
                                   "--max-new-tokens", "1", "--skip-naive", "--workdir", str(keep)])
    assert res.exit_code == 0, res.output
    assert f"m3 bench: scenes in {keep}" in res.stderr and len(list(keep.glob("*.png"))) == 2


def test_bench_decode_and_serve_name_the_machine():
    from m3cli.bench.serve import machine_line

    res = CliRunner().invoke(cli, ["bench", "decode", "--sizes", "64x48", "--repeat", "1", "--warm-up", "0"])
    assert res.exit_code == 0, res.output
    first = res.stdout.splitlines()[0]
    assert "CPU " in first and "cores" in first and "1 decode thread" in first and "device cpu" in first
    line = machine_line(2)
    assert "CPU " in line and "2 threads per server" in line and "device cpu" in line


def test_bench_serve_works_in_a_temporary_folder_unless_told():
    text = " ".join(CliRunner().invoke(cli, ["bench", "serve", "--help"]).stdout.split())
    assert "default: a temporary folder, removed at the end" in text and "runs/bench-serve" not in text


def test_bench_help_says_where_results_go():
    res = CliRunner().invoke(cli, ["bench", "--help"])
    text = " ".join(res.stdout.split())
    assert "Markdown tables on stdout" in text and "results go to docs" not in text
    assert "Nothing is written to disk unless --workdir DIR is given" in text


def test_escalation_of_one_timing_shows_no_spread(tiny_model_dir):
    res = CliRunner().invoke(cli, ["bench", "escalation", "--model", str(tiny_model_dir), "-n", "1", "--repeat", "1"])
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("| 1 "))
    assert row.rstrip().endswith("| - |")


def test_a_resumed_count_and_a_status_note():
    out = io.StringIO()
    bar = Progress("m3 train: vqa", total=10, unit="step", mode="log", stream=out, interval=0, initial=4)
    bar.update(1, "144=0.310")
    line = out.getvalue().splitlines()[0]
    assert line.startswith("m3 train: vqa: 5/10 steps (50%)") and line.endswith("· 144=0.310")
