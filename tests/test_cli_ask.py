import json

import pytest
from click.testing import CliRunner

from m3cli.cli import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.mark.parametrize("tokens", [576, 144, 36, 9, 1])
def test_ask_text_at_every_scale(run, tiny_model_dir, scene_png, tokens):
    res = run("ask", scene_png, "what colour is the background?", "--tokens", tokens, "--model", tiny_model_dir,
              "--max-new-tokens", 3)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() != "" or res.stdout == "\n"
    assert "Traceback" not in res.output


@pytest.mark.parametrize("tokens", [576, 9, 1])
def test_ask_json(run, tiny_model_dir, scene_png, tokens):
    res = run("ask", scene_png, "how many shapes are there?", "--tokens", tokens, "--model", tiny_model_dir,
              "--json", "--max-new-tokens", 3)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert row["tokens"] == tokens
    assert row["backend"] == "torch"
    assert row["model"] == str(tiny_model_dir)
    assert 0.0 <= row["confidence"] <= 1.0
    assert set(row["timings"]) >= {"encode_ms", "prefill_ms", "decode_ms"}
    assert [r["tokens"] for r in row["scales_tried"]] == [tokens]
    assert isinstance(row["answer"], str)


def test_ask_json_answer_matches_text(run, tiny_model_dir, scene_png):
    args = ("ask", scene_png, "is there a red circle?", "--tokens", 36, "--model", tiny_model_dir,
            "--max-new-tokens", 4)
    text = run(*args).stdout.strip()
    assert json.loads(run(*args, "--json").stdout)["answer"] == text


def test_budget_is_rounded_and_said(run, tiny_model_dir, scene_png):
    res = run("ask", scene_png, "what colour is the background?", "--tokens", 100, "--model", tiny_model_dir,
              "--json", "--max-new-tokens", 2)
    assert res.exit_code == 0
    row = json.loads(res.stdout)
    assert row["tokens"] == 36 and row["run"]["tokens"] == 100  # the budget asked is the run's
    assert "rounded down to 36" in res.stderr


def _one_line_error(res):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "error" in lines[0]
    assert res.stdout == ""
    return lines[0]


def test_missing_image(run, tiny_model_dir, tmp_path):
    line = _one_line_error(run("ask", tmp_path / "nope.png", "q?", "--model", tiny_model_dir))
    assert "nope.png" in line


def test_non_image_file(run, tiny_model_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    line = _one_line_error(run("ask", bad, "q?", "--model", tiny_model_dir))
    assert "notes.png" in line


def test_unreadable_model_dir(run, scene_png, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    _one_line_error(run("ask", scene_png, "q?", "--model", tmp_path / "model"))
    _one_line_error(run("ask", scene_png, "q?", "--model", tmp_path / "absent"))


@pytest.mark.parametrize("tokens", ["0", "-1", "abc", "2.5"])
def test_bad_token_budget(run, scene_png, tiny_model_dir, tokens):
    line = _one_line_error(run("ask", scene_png, "q?", "--tokens", tokens, "--model", tiny_model_dir))
    assert "budget" in line


def test_unknown_option_is_one_line(run, scene_png):
    _one_line_error(run("ask", scene_png, "q?", "--bogus"))


def test_help_shows_example(run):
    res = run("ask", "--help")
    assert res.exit_code == 0
    assert "Examples:" in res.stdout and "--tokens 9" in res.stdout


def test_ask_auto_scale_records_rungs(run, tiny_model_dir, scene_png):
    res = run("ask", scene_png, "what colour is the background?", "--auto-scale", "--threshold", "1.0",
              "--model", tiny_model_dir, "--json", "--max-new-tokens", 2)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert [r["tokens"] for r in row["scales_tried"]] == [1, 9, 36, 144, 576]
    assert row["tokens"] == 576 and row["answer"] == row["scales_tried"][-1]["answer"]


def test_ask_auto_scale_budget_caps_ladder(run, tiny_model_dir, scene_png):
    res = run("ask", scene_png, "what colour is the background?", "--auto-scale", "--threshold", "1.0",
              "--tokens", 40, "--ladder", "9,36,576", "--model", tiny_model_dir, "--json", "--max-new-tokens", 2)
    row = json.loads(res.stdout)
    assert [r["tokens"] for r in row["scales_tried"]] == [9, 36]


def test_ask_threshold_needs_auto_scale(run, tiny_model_dir, scene_png):
    _one_line_error(run("ask", scene_png, "q?", "--threshold", "0.5", "--model", tiny_model_dir))
    _one_line_error(run("ask", scene_png, "q?", "--auto-scale", "--ladder", "10,36", "--model", tiny_model_dir))
