"""Every input path is checked by its type before anything opens it, every line-oriented input goes through one
bounded reader, and inputs get accurate one-line messages: one test per defect (numbered as in the defect list
this suite answers)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import one_error_line as _one_error_line
from cli_helpers import png as _img
from cli_helpers import rows as _rows
from cli_helpers import run_cli as _run
from cli_helpers import run_m3 as _m3

Q = "what colour is the background?"


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)
    return path


def _samples(folder: Path, rows: list[dict], model, *extra) -> list[dict]:
    data = folder / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = folder / "s.jsonl"
    res = _run(["eval", "--data", data, "--tokens", "1", "--max-new-tokens", "1", "--samples", samples,
                "--model", model, *extra])
    assert res.exit_code == 0, res.output
    return _rows(samples.read_text())


# ------------------------------------------------------------------------------------ hangs and memory


def test_13_a_named_fifo_never_blocks(tmp_path, tiny_model_dir):
    fifo = _fifo(tmp_path / "p.png")
    good = _img(tmp_path / "x.png")
    ask = _m3(["ask", fifo, Q, "--model", tiny_model_dir], timeout=120)
    assert ask.returncode == 2, ask.stderr  # the image is read before the model loads
    _one_error_line(ask.stderr.decode(), "is a FIFO (named pipe), not a regular file")
    batch = _m3(["batch", fifo, good, "-q", Q, "--tokens", "1", "--max-new-tokens", "1", "--model", tiny_model_dir],
                timeout=120)
    assert batch.returncode == 1, batch.stderr
    rows = _rows(batch.stdout)
    assert [r["source"] for r in rows] == [str(fifo), str(good)]
    assert "is a FIFO" in rows[0]["error"] and rows[1]["error"] is None
    data = tmp_path / "data"
    data.mkdir()
    _fifo(data / "stuck.jsonl")
    (data / "q.jsonl").write_text(json.dumps({"image": str(good), "question": Q, "answer": "red"}) + "\n")
    ev = _m3(["eval", "--data", data, "--tokens", "1", "--max-new-tokens", "1", "--model", tiny_model_dir],
             timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert "skipped" in ev.stderr.decode() and "stuck.jsonl" in ev.stderr.decode()
    ev = _m3(["eval", "--data", data / "stuck.jsonl", "--model", tiny_model_dir], timeout=120)
    assert ev.returncode == 2
    _one_error_line(ev.stderr.decode(), "is a FIFO")


def test_14_input_without_newlines_stops_at_once_with_bounded_memory(tmp_path, tiny_model_dir):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    # a parent of its own, so the peak memory measured is this run's alone
    wrapper = ("import resource, subprocess, sys; "
               "p = subprocess.run([sys.executable, '-m', 'm3cli', 'batch', '-', '--max-new-tokens', '1', "
               f"'--model', {str(tiny_model_dir)!r}], stdin=open('/dev/zero', 'rb'), capture_output=True); "
               "sys.stdout.buffer.write(p.stdout); "
               "sys.stderr.write(f'{p.returncode} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, timeout=300)
    assert time.monotonic() - start < 120
    code, peak_kb = map(int, proc.stderr.decode().split()[-2:])
    assert code == 1, proc.stderr
    assert peak_kb / 1024 < 2000, peak_kb  # the model, and at most one 16 MiB line of the input
    rows = _rows(proc.stdout)
    assert len(rows) == 1 and "longer than 16 MiB" in rows[0]["error"] and "not read further" in rows[0]["error"]
    data = tmp_path / "big.jsonl"
    with open(data, "wb") as f:
        f.write(b'{"image": "a.png", "question": "' + b"x" * (17 * 1024 * 1024))
    res = _run(["eval", "--data", data, "--model", tmp_path / "no-such-model"])
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "line 1 is longer than 16 MiB")


def test_bounded_reader_reads_normal_lines_and_stops_a_long_one():
    from m3cli.fileio import LineTooLong, iter_lines

    assert list(iter_lines(io.BytesIO(b"a\nbb\n\nccc"), limit=4)) == [b"a\n", b"bb\n", b"\n", b"ccc"]
    stream = io.BytesIO(b"ok\n" + b"y" * 100 + b"\nrest\n")
    lines = iter_lines(stream, limit=10)
    assert next(lines) == b"ok\n"
    with pytest.raises(LineTooLong, match="line 2 is longer than 10 bytes"):
        next(lines)
    assert stream.tell() <= 3 + 11  # never more than the limit of the long line was read


def test_15_eval_checks_each_question_like_batch(tmp_path, tiny_model_dir):
    image = _img(tmp_path / "a.png")
    rows = [{"image": str(image), "question": "what colour? " * 800, "answer": "red"},
            {"image": str(image), "question": Q, "answer": "red"}]
    samples = _samples(tmp_path, rows, tiny_model_dir)
    assert "question too long: 10399 characters > 2000" in samples[0]["error"]
    assert samples[1]["error"] is None
    # within the character limit but not within the model's context: refused before the model runs too
    samples = _samples(tmp_path, rows, tiny_model_dir, "--max-question-chars", "20000", "--overwrite")
    assert "too long for the model" in samples[0]["error"] and samples[1]["error"] is None


# ------------------------------------------------------------------------------------- wrong messages


def test_19_walks_warn_about_broken_links_and_fifos(tmp_path, caplog):
    from m3cli.media import iter_inputs

    folder = tmp_path / "frames"
    _img(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _fifo(folder / "pipe.png")
    with caplog.at_level(logging.WARNING, logger="m3cli"):
        items = list(iter_inputs([str(folder)]))
    assert [os.path.basename(i.id) for i in items] == ["a.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("gone.png" in w and "broken symbolic link" in w for w in warnings), warnings
    assert any("pipe.png" in w and "FIFO" in w for w in warnings), warnings


def test_20_special_files_are_named_for_what_they_are(tmp_path, tiny_model_dir):
    fifo = _fifo(tmp_path / "p.png")
    good = _img(tmp_path / "a.png")
    rows = [{"image": "/dev/zero", "question": Q, "answer": "red"},
            {"image": str(fifo), "question": Q, "answer": "red"},
            {"image": str(good), "question": Q, "answer": "red"}]
    samples = _samples(tmp_path, rows, tiny_model_dir)
    assert "image is a character device, not a regular file: /dev/zero" in samples[0]["error"]
    assert "image is a FIFO (named pipe), not a regular file" in samples[1]["error"]
    assert samples[2]["error"] is None
    res = _run(["convert", "--fix-mmproj", "/dev/null", tmp_path / "fixed"])
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "/dev/null: is a character device, not a regular file")


def test_21_eval_field_messages(tmp_path):
    from m3cli.eval.data import BadRow, read_eval_data

    _img(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "how many?", "answers": [1, None]},
            {"image": "a.png", "question": 7, "answer": "x"},
            {"image": "a.png", "question": "is it?", "answer": True},
            {"image": "a.png", "question": "how many?", "answers": ["2", " "]},
            {"image": "a.png", "question": "how many?", "answer": 3}]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = list(read_eval_data(data))
    reasons = [r.reason if isinstance(r, BadRow) else None for r in got]
    assert reasons == ["'answers' item 2 is null", "'question' must be a string (got a number)",
                       "'answer' must be a string or a number (got a boolean)", "'answers' item 2 is empty", None]
    assert got[4].gold == ("3",)  # a number is a fine answer to "how many"


def test_22_a_bad_row_under_several_questions_is_labelled_with_its_own(tmp_path, tiny_model_dir):
    image = str(_img(tmp_path / "a.png"))
    stdin = json.dumps({"image": image, "question": "what is mine?", "tokens": "many"}) + "\n" + \
        json.dumps({"image": image, "tokens": 0}) + "\n"
    res = _run(["batch", "-", "-q", Q, "-q", "how many shapes are there?", "--max-new-tokens", "1", "--model",
                tiny_model_dir], input=stdin)
    assert res.exit_code == 1, res.output
    rows = _rows(res.stdout)
    assert [(r["question"], "'tokens'" in r["error"]) for r in rows] == [
        ("what is mine?", True),  # its own question: one row, as its answer would have been
        (Q, True), ("how many shapes are there?", True)]  # none of its own: one per -q


@pytest.mark.parametrize("args", [["ask", "x.png", "--model", ""], ["batch", "x.png", "-m", " "],
                                  ["eval", "--tokens", ""], ["eval", "--tokens", "1,,9"], ["eval", "--tokens", "9,9"],
                                  ["eval", "--thresholds", "0.5,,0.9"], ["batch", "x.png", "--auto-scale",
                                                                         "--ladder", "9,9"],
                                  ["ask", "x.png", "--chat-template", ""], ["ask", "x.png", "--mmproj", ""]])
def test_23_option_values_are_checked_at_parse_time(args, tmp_path):
    res = _run(args + (["--model", tmp_path / "no-such-model"] if "--model" not in args and "-m" not in args else []))
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "Invalid value")


def test_27_a_url_is_said_to_be_a_url(tmp_path, tiny_model_dir):
    url = "https://example.com/cat.png"
    res = _run(["ask", url, Q, "--model", tiny_model_dir])
    assert res.exit_code == 2
    _one_error_line(res.stderr, "is a URL: m3 reads local files only, not URLs")
    res = _run(["batch", url, "-q", Q, "--model", tiny_model_dir])
    assert res.exit_code == 1 and "is a URL" in _rows(res.stdout)[0]["error"]
    good = _img(tmp_path / "a.png")
    samples = _samples(tmp_path, [{"image": url, "question": Q, "answer": "x"},
                                  {"image": str(good), "question": Q, "answer": "red"}], tiny_model_dir)
    assert samples[0]["error"].endswith(f"image is a URL: m3 reads local files only, not URLs (download it first): "
                                        f"{url}")
