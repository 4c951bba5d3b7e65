"""m3 batch end to end on a tiny random model: mixed folders, videos, stdin, resume, exit codes."""

import json

import pytest
from click.testing import CliRunner
from media_factory import write_video
from PIL import Image

from m3cli.cli import cli
from m3cli.engines.local import BatchOptions, run_batch
from m3cli.media import iter_inputs
from m3cli.output import OrderedWriter, Summary

Q = "what colour is the background?"


def _img(path, colour, size=(48, 48), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path




@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "in"
    _img(root / "a.png", (200, 0, 0))
    _img(root / "B.JPG", (0, 200, 0))
    _img(root / "sub" / "c.gif", (0, 0, 200), mode="P")
    _img(root / "sub" / "ünï cødé.webp", (90, 90, 90))
    _img(root / "gray.png", (120, 120, 120), mode="L")
    _img(root / ".hidden.png", (1, 2, 3))
    (root / "notes.txt").write_text("not media")
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)
    write_video(root / "sub" / "clip.mp4")
    return root


def _run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def _rows(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_mixed_folder_rows(mixed, tiny_model_dir):
    res = _run(["batch", mixed, "-q", Q, "--tokens", 9, "--model", tiny_model_dir, "--max-frames", 3,
                "--max-new-tokens", 2])
    assert res.exit_code == 1, res.output  # two bad files
    rows = _rows(res.stdout)
    ids = [r["id"] for r in rows]
    root = str(mixed)
    expected_images = [f"{root}/B.JPG", f"{root}/a.png", f"{root}/corrupt.jpg", f"{root}/empty.png",
                       f"{root}/gray.png"]
    assert ids[:5] == expected_images
    frames = [r for r in rows if r["frame"] is not None]
    assert len(frames) == 3 and all(r["source"].endswith("clip.mp4") for r in frames)
    assert frames[0]["time_s"] == 0.0 and [r["frame"] for r in frames] == sorted(r["frame"] for r in frames)
    assert ids[5] == f"{root}/sub/c.gif" and ids[-1] == f"{root}/sub/ünï cødé.webp"
    assert all(i.startswith(f"{root}/sub/clip.mp4#") for i in ids[6:9])
    assert not any(".hidden" in i or "notes" in i for i in ids)
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {f"{root}/corrupt.jpg", f"{root}/empty.png"}
    assert all("\n" not in e for e in errors.values())
    good = [r for r in rows if not r["error"]]
    assert all(r["tokens"] == 9 and r["question"] == Q and r["backend"] == "torch" for r in good)
    assert all(isinstance(r["answer"], str) and r["timings"]["encode_ms"] > 0 for r in good)
    assert "done 8, failed 2" in res.stderr


def test_progress_bar_counts_rows_on_stderr(mixed, tiny_model_dir):
    res = _run(["batch", f"{mixed}/a.png", f"{mixed}/gray.png", "-q", Q, "--tokens", 1, "--model", tiny_model_dir,
                "--max-new-tokens", 1, "--progress"])
    assert res.exit_code == 0, res.output
    assert len(_rows(res.stdout)) == 2
    assert "m3 batch" in res.stderr and "2/2" in res.stderr  # files named: the bar knows the total


def test_batch_size_does_not_change_answers(mixed, tiny_model_dir):
    common = ["batch", mixed, "-q", Q, "--tokens", 36, "--model", tiny_model_dir, "--max-frames", 3,
              "--max-new-tokens", 3]
    one = _rows(_run(common + ["--batch-size", 1]).stdout)
    eight = _rows(_run(common + ["--batch-size", 8]).stdout)
    assert [(r["id"], r["answer"], r["tokens"]) for r in one] == [(r["id"], r["answer"], r["tokens"]) for r in eight]
    for a, b in zip(one, eight, strict=True):
        if a["confidence"] is not None:
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)


def test_stdin_paths_and_jsonl(mixed, tiny_model_dir):
    paths = f"{mixed}/a.png\n\n{mixed}/gray.png\n"
    res = _run(["batch", "-", "-q", Q, "--model", tiny_model_dir, "--max-new-tokens", 2, "--tokens", 1], input=paths)
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in _rows(res.stdout)] == [f"{mixed}/a.png", f"{mixed}/gray.png"]
    jsonl = "\n".join([
        json.dumps({"image": f"{mixed}/a.png", "question": "how many shapes are there?", "tokens": 36, "id": "x1"}),
        json.dumps({"image": f"{mixed}/B.JPG", "tokens": 100, "id": "x2"}),
        "{not json",
    ])
    res = _run(["batch", "-", "-q", Q, "--model", tiny_model_dir, "--max-new-tokens", 2], input=jsonl)
    rows = _rows(res.stdout)
    assert res.exit_code == 1
    assert rows[0]["id"] == "x1" and rows[0]["question"] == "how many shapes are there?" and rows[0]["tokens"] == 36
    assert rows[1]["id"] == "x2" and rows[1]["question"] == Q and rows[1]["tokens"] == 36  # 100 rounds to 36
    assert rows[2]["error"] and "line 3" in rows[2]["error"]


def test_resume_after_kill_is_exactly_once(mixed, tiny_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", mixed, "-q", Q, "--tokens", 9, "--model", tiny_model_dir, "--max-frames", 3,
            "--max-new-tokens", 2, "-o", out]
    full = _run(args)
    reference = out.read_text()
    lines = reference.splitlines(keepends=True)
    # simulate a SIGKILL mid-write: four complete rows, then half of the fifth
    out.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    res = _run(args + ["--resume"])
    assert res.exit_code == full.exit_code
    resumed = _rows(out.read_text())
    assert [r["id"] for r in resumed] == [r["id"] for r in _rows(reference)]
    assert [r["answer"] for r in resumed] == [r["answer"] for r in _rows(reference)]
    assert "skipped 4" in res.stderr
    # resuming a finished run does nothing and keeps the file
    before = out.read_text()
    again = _run(args + ["--resume"])
    assert out.read_text() == before
    assert "skipped 10 (2 with an earlier error row)" in again.stderr
    assert again.exit_code == 1  # the output still holds two error rows


def test_formats(mixed, tiny_model_dir):
    base = ["batch", f"{mixed}/a.png", f"{mixed}/empty.png", "-q", Q, "--model", tiny_model_dir,
            "--max-new-tokens", 2]
    csv_out = _run(base + ["--format", "csv"]).stdout.splitlines()
    assert csv_out[0].startswith("id,source,frame,time_s,question,answer") and len(csv_out) == 3
    text = _run(base + ["--format", "text"]).stdout.splitlines()
    assert len(text) == 2 and "ERROR:" in text[1]


@pytest.mark.parametrize("args,needle", [
    (["--resume"], "--resume needs -o"),
    (["--tokens", "0"], "budget"),
    (["--fps", "1", "--every", "2"], "cannot be combined"),
    (["--threshold", "0.5"], "need --auto-scale"),
])
def test_usage_errors_exit_2(mixed, tiny_model_dir, args, needle):
    res = _run(["batch", mixed, "-q", Q, "--model", tiny_model_dir, *args])
    assert res.exit_code == 2 and needle in res.stderr and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1


def test_model_error_before_work_exits_2(mixed, tmp_path):
    res = _run(["batch", mixed, "-q", Q, "--model", tmp_path / "nope"])
    assert res.exit_code == 2 and res.stdout == ""


def test_missing_question_asks_the_default(mixed, tiny_model_dir):
    # without -q the documented default question is asked (it was an error row per item)
    res = _run(["batch", f"{mixed}/a.png", "--model", tiny_model_dir])
    assert res.exit_code == 0 and _rows(res.stdout)[0]["question"] == "What is this?"


def test_runner_streams_with_bounded_prefetch(mixed, tiny_backend):
    """The runner pulls inputs lazily: it never enumerates far ahead of what it has answered."""
    pulled = []

    def inputs():
        for item in iter_inputs([str(mixed / "a.png")] * 1):
            for k in range(40):
                pulled.append(k)
                yield type(item)(id=f"{item.id}-{k}", source=item.source, kind="image")

    written = []

    class Sink:
        def write(self, row):
            written.append((len(pulled), row["id"]))

        def flush(self):
            pass

        def close(self):
            pass

    opts = BatchOptions(question=Q, tokens=1, batch_size=4, max_new_tokens=1, prefetch=4)
    run_batch(tiny_backend, inputs(), opts, OrderedWriter(Sink()), Summary())
    assert len(written) == 40
    # when the first row was written, at most batch + prefetch + slack items had been pulled
    assert written[0][0] <= 4 + 4 + 2


def test_three_shards_merged_equal_single_process(mixed, tiny_model_dir, tmp_path):
    common = ["batch", mixed, "-q", Q, "--tokens", 9, "--model", tiny_model_dir, "--max-frames", 3,
              "--max-new-tokens", 2]
    single = _rows(_run(common).stdout)
    outs = []
    for k in range(3):
        out = tmp_path / f"shard-{k}.jsonl"
        res = _run(common + ["--shard", f"{k}/3", "-o", out])
        assert res.exit_code in (0, 1), res.output
        outs.append(out)
    merged_path = tmp_path / "all.jsonl"
    res = _run(["merge", *outs, "-o", merged_path])
    assert res.exit_code == 0, res.output
    merged = _rows(merged_path.read_text())

    def key(rows):
        return [(r["id"], r["answer"], r["tokens"], r["error"], r["frame"]) for r in rows]

    assert key(merged) == key(single)
    assert all("input_index" not in r for r in merged)


def test_merge_reports_a_missing_shard(mixed, tiny_model_dir, tmp_path):
    common = ["batch", mixed, "-q", Q, "--tokens", 1, "--model", tiny_model_dir, "--max-frames", 2,
              "--max-new-tokens", 1]
    outs = []
    for k in (0, 1):
        out = tmp_path / f"s{k}.jsonl"
        _run(common + ["--shard", f"{k}/3", "-o", out])
        outs.append(out)
    res = _run(["merge", *outs, "-o", tmp_path / "all.jsonl"])
    assert res.exit_code == 1 and "shard 2" in res.stderr


@pytest.mark.parametrize("spec", ["3/2", "a/b", "1", "-1/3"])
def test_bad_shard_spec(mixed, tiny_model_dir, tmp_path, spec):
    res = _run(["batch", mixed, "-q", Q, "--model", tiny_model_dir, "--shard", spec, "-o", tmp_path / "o.jsonl"])
    assert res.exit_code == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1


def test_ray_options_need_engine_ray(mixed, tiny_model_dir):
    res = _run(["batch", mixed, "-q", Q, "--model", tiny_model_dir, "--actors", 2])
    assert res.exit_code == 2 and "--engine ray" in res.stderr and res.stdout == ""


def test_engine_ray_unreachable_address_exits_2(mixed, tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o.jsonl"
    res = _run(["batch", mixed, "-q", Q, "--model", tiny_model_dir, "--engine", "ray",
                "--ray-address", f"127.0.0.1:{port}", "-o", out])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
