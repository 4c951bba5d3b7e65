"""The run record holds the policy in full (flags over the model's tuned policy) and the checks that read it
agree: ``--resume`` and ``m3 merge`` compare it, rows of runs made before ``measure`` / ``on_miss`` existed
still match, and the progress total counts the rows a resumed run will answer, by the ids the run uses.
Also: ``m3 bench --workdir`` through the output guard, and ``m3 models`` finding conversions in a shared cache."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from m3cli.cli import cli


def _run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def _folder(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (48, 48), (60 * i, 90, 30)).save(folder / f"{i}.png")
    return folder


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _one_error_line(stderr: str, needle: str) -> None:
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], stderr
    assert "Traceback" not in stderr, stderr


def _totals(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("m3 batch: ") and "items (" in ln]


def test_resume_compares_the_measure_and_names_it(tiny_model_dir, tmp_path):
    folder = _folder(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    base = ["batch", folder, "-q", "q", "--model", tiny_model_dir, "--max-new-tokens", "1", "--auto-scale", "-o", out]
    assert _run(base).exit_code == 0
    run = _rows(out)[0]["run"]
    # the defaults are left out of the record, so rows made before --measure and --on-miss existed match
    assert run["auto_scale"] is True and "measure" not in run and "on_miss" not in run
    res = _run([*base, "--resume", "--measure", "mean"])
    assert res.exit_code == 2
    _one_error_line(res.stderr, "--measure")
    res = _run([*base, "--resume", "--on-miss", "best"])
    assert res.exit_code == 2
    _one_error_line(res.stderr, "--on-miss")
    # stating the defaults is the same run: nothing to answer again
    res = _run([*base, "--resume", "--measure", "sequence", "--on-miss", "last"])
    assert res.exit_code == 0, res.stderr
    assert len(_rows(out)) == 2


def test_merge_refuses_shards_made_with_another_policy(tiny_model_dir, tmp_path):
    folder = _folder(tmp_path, 3)
    common = ["batch", folder, "-q", "q", "--model", tiny_model_dir, "--max-new-tokens", "1", "--auto-scale"]
    assert _run([*common, "--shard", "0/2", "-o", tmp_path / "s0.jsonl"]).exit_code == 0
    assert _run([*common, "--on-miss", "best", "--shard", "1/2", "-o", tmp_path / "s1.jsonl"]).exit_code == 0
    res = _run(["merge", tmp_path / "s0.jsonl", tmp_path / "s1.jsonl", "-o", tmp_path / "all.jsonl"])
    assert res.exit_code == 2
    _one_error_line(res.stderr, "--on-miss")
    assert not (tmp_path / "all.jsonl").exists()
    assert _run([*common, "--shard", "1/2", "-o", tmp_path / "s1.jsonl", "--overwrite"]).exit_code == 0
    res = _run(["merge", tmp_path / "s0.jsonl", tmp_path / "s1.jsonl", "-o", tmp_path / "all.jsonl"])
    assert res.exit_code == 0, res.stderr
    assert len(_rows(tmp_path / "all.jsonl")) == 3


def test_progress_total_after_resume_counts_only_what_is_left(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("M3_PROGRESS_SECONDS", "0")
    folder = _folder(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    args = ["batch", folder, "-q", "q", "--model", tiny_model_dir, "--tokens", "9", "--max-new-tokens", "1", "-o", out]
    assert _run(args).exit_code == 0
    _folder(tmp_path, 5)  # three more images in the folder
    res = _run([*args, "--resume"])
    assert res.exit_code == 0, res.stderr
    assert _totals(res.stderr)[-1].startswith("m3 batch: 3/3 items (100%)"), res.stderr
    assert len(_rows(out)) == 5


def test_openai_batch_progress_total_names_lines_as_the_run_does(tiny_model_dir, scene_png, tmp_path, monkeypatch):
    """A line without custom_id is named by its content, in the run and in the count alike: a line inserted
    above it changes neither, so the resumed run's total is the one new line."""
    monkeypatch.setenv("M3_PROGRESS_SECONDS", "0")
    url = "data:image/png;base64," + base64.b64encode(scene_png.read_bytes()).decode()

    def request(custom_id=None):
        line = {"method": "POST", "url": "/v1/chat/completions", "body": {"max_tokens": 1, "m3": {"tokens": 9},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]}}
        return json.dumps(line if custom_id is None else {"custom_id": custom_id, **line})

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([request("a"), request(), request("b")]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["batch", requests, "--input-format", "openai", "--model", tiny_model_dir, "-o", out]
    first = _run(args)
    assert first.exit_code == 1  # the line without custom_id is an error row
    assert _totals(first.stderr)[-1].startswith("m3 batch: 3/3 items"), first.stderr
    requests.write_text("\n".join([request("new"), request("a"), request(), request("b")]) + "\n")
    res = _run([*args, "--resume"])
    assert _totals(res.stderr)[-1].startswith("m3 batch: 1/1 items (100%)"), res.stderr
    rows = _rows(out)
    assert [r["id"] for r in rows[3:]] == ["new"] and len(rows) == 4


def test_bench_workdir_goes_through_the_output_guard_when_the_command_is_read(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = _run(["bench", "memory", "--workdir", blocker, "--small", "1", "--large", "2"])
    assert res.exit_code == 2
    _one_error_line(res.stderr, "--workdir")
    assert blocker.read_text() == "not a folder"


def test_models_lists_conversions_in_a_shared_cache_root_and_creates_nothing(tmp_path):
    from m3cli.convert.original_cache import cached_conversions

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)  # a group cache: m3 keeps its entries in an owner-only subfolder
    entry = shared / f"m3cli-{os.getuid()}" / "converted" / "org-conv-m3-0123456789abcdef"
    entry.mkdir(parents=True)
    (entry.parent / ".partial-xyz").mkdir()  # a conversion still being built is not listed
    assert cached_conversions("org/conv-m3", root=shared) == [entry]
    absent = tmp_path / "absent"
    assert cached_conversions("org/conv-m3", root=absent) == [] and not absent.exists()
