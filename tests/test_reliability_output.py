"""The output side and the default question: no input, file or option may kill a run, lose a row or destroy
a file. One test per failure (numbered in the test names), then a property test: random kills during a run
over bad names, bad files and odd questions, resumed until done, equal a straight run.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import one_error_line as _one_error_line
from cli_helpers import run_cli as _run
from cli_helpers import run_m3 as _m3
from PIL import Image, ImageOps

Q = "what colour is the background?"
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "models" / "examples"
SHIPPED = REPO / "models" / "m3-shapes"
TIMINGS = re.compile(rb'"timings":\{[^{}]*\}')


def _img(path: Path | bytes, colour=(200, 0, 0)) -> bytes:
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    Image.new("RGB", (48, 48), colour).save(os.fsdecode(raw), format="PNG")
    return raw


def _rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _base(model, *extra):
    return ["batch", "-q", Q, "--tokens", "1", "--max-new-tokens", "2", "--model", str(model), *extra]


# ------------------------------------------------------------------------------------- 1: non-UTF-8 names


def test_non_utf8_file_names_written_escaped_everywhere_and_resumable(tmp_path, tiny_model_dir):
    """#1: a name that is not valid UTF-8 never aborts a run: valid UTF-8 rows in every sink, the bytes
    recoverable from source_b64, the same ids from stdin, shards and --resume."""
    root = tmp_path / "in"
    good = _img(root / "a.png")
    odd = _img(os.fsencode(root) + b"/b\xff.png", (0, 200, 0))
    bad = os.fsencode(root) + b"/c\xfe.png"
    Path(os.fsdecode(bad)).write_bytes(b"")  # an empty file: an error row whose message names it
    base = _base(tiny_model_dir)
    out = tmp_path / "out.jsonl"

    res = _run(base + [str(root), "-o", str(out)])
    assert res.exit_code == 1, res.output  # the empty file only
    data = out.read_bytes()
    rows = _rows(data)  # strict UTF-8
    by_source = {base64.b64decode(r["source_b64"]) if r["source_b64"] else os.fsencode(r["source"]): r
                 for r in rows}
    assert set(by_source) == {good, odd, bad}
    assert by_source[odd]["id"] == f"{root}/b\\xff.png" and by_source[odd]["source"] == f"{root}/b\\xff.png"
    assert by_source[good]["source_b64"] is None and by_source[odd]["error"] is None
    assert "c\\xfe.png" in by_source[bad]["error"]
    ids = [r["id"] for r in rows]

    again = _run(base + [str(root), "-o", str(out), "--resume"])
    assert again.exit_code == 1 and "skipped 3" in again.stderr and out.read_bytes() == data

    for fmt in ("csv", "text"):
        res = _run(base + [str(root), "--format", fmt])
        text = res.stdout_bytes.decode("utf-8")
        assert "b\\xff.png" in text and res.exit_code == 1, res.output

    res = _run(base + ["-"], input=b"".join(p + b"\n" for p in (good, odd, bad)))
    assert sorted(r["id"] for r in _rows(res.stdout_bytes)) == sorted(ids)

    shards = []
    for k in range(2):
        shards.append(tmp_path / f"s{k}.jsonl")
        assert _run(base + [str(root), "--shard", f"{k}/2", "-o", str(shards[-1])]).exit_code in (0, 1)
    merged = _run(["merge", *map(str, shards)])
    assert merged.exit_code == 0, merged.output
    assert [r["id"] for r in _rows(merged.stdout_bytes)] == ids

    # a strict UTF-8 stdout and names arriving on stdin as raw bytes, in a real process
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")
    proc = _m3(base + ["-"], input=b"".join(p + b"\n" for p in (good, odd, bad)), env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")
    assert [r["id"] for r in _rows(proc.stdout)] == [f"{root}/a.png", f"{root}/b\\xff.png", f"{root}/c\\xfe.png"]


# ------------------------------------------------------------------------- 3: --resume on a foreign file


FOREIGN = {
    "csv": b"id,source,answer\na.png,a.png,red\n",
    "notes": b"remember to resume this run\nwith the same question\n",
    "notes-no-newline": b"just a note",
    "pretty-json": b'{\n  "id": "a.png",\n  "answer": "red"\n}\n',
    "input-list": b'{"image": "IMG", "question": "what colour is the background?"}\n',
}


@pytest.mark.parametrize("kind", sorted(FOREIGN) + ["csv-from-m3", "input-list-on-stdin"])
def test_resume_refuses_a_file_that_is_not_our_jsonl(tmp_path, tiny_model_dir, kind):
    """#3: --resume on a CSV, notes, pretty JSON or the input list itself: exit 2, one line, file untouched."""
    image = _img(tmp_path / "a.png").decode()
    out = tmp_path / "out.jsonl"
    if kind == "csv-from-m3":
        out.write_bytes(_run(_base(tiny_model_dir, image, "--format", "csv")).stdout_bytes)
    else:
        out.write_bytes(FOREIGN[kind.replace("-on-stdin", "")].replace(b"IMG", image.encode()))
    before = out.read_bytes()
    args = ["-"] if kind == "input-list-on-stdin" else [image]
    res = _run(_base(tiny_model_dir, *args, "-o", str(out), "--resume"), input=before)
    assert res.exit_code == 2 and res.stdout == "", res.output
    _one_error_line(res.stderr, "not m3 batch JSONL")
    assert out.read_bytes() == before
    # an empty file is a run that has not written yet: fine
    out.write_bytes(b"")
    assert _run(_base(tiny_model_dir, image, "-o", str(out), "--resume")).exit_code == 0
    assert len(_rows(out.read_bytes())) == 1


# ------------------------------------------------------------------- 4: --resume with another question


def test_resume_refuses_rows_made_with_another_question_model_or_budget(tmp_path, tiny_model_dir):
    """#4: --resume compares what the rows were made with; a difference is one line naming it, exit 2."""
    image = _img(tmp_path / "a.png").decode()
    out = tmp_path / "out.jsonl"
    common = ["batch", image, "--max-new-tokens", "2", "-o", str(out)]
    assert _run(common + ["-q", Q, "--tokens", "9", "--model", str(tiny_model_dir)]).exit_code == 0
    before = out.read_bytes()
    cases = [
        (["-q", "how many shapes are there?", "--tokens", "9", "--model", str(tiny_model_dir)], "question"),
        (["-q", Q, "--tokens", "1", "--model", str(tiny_model_dir)], "--tokens"),
        (["-q", Q, "--tokens", "9", "--model", str(SHIPPED)], "model"),
    ]
    for args, needle in cases:
        res = _run(common + args + ["--resume"])
        assert res.exit_code == 2 and res.stdout == "", res.output
        _one_error_line(res.stderr, needle)
        assert out.read_bytes() == before
    forced = _run(common + cases[0][0] + ["--resume", "--force"])
    assert forced.exit_code == 0 and "skipped 1" in forced.stderr and out.read_bytes() == before


# --------------------------------------------------------------------- 5: Ctrl-C with error rows pending


def test_interrupt_with_error_rows_pending_keeps_input_order(tmp_path, tiny_model_dir, monkeypatch):
    """#5: Ctrl-C while an error row waits behind an unanswered item: no row past the gap; --resume then
    completes the file in input order."""
    from m3cli.backends.torch import TorchBackend

    root = tmp_path / "in"
    for name in ("a.png", "c.png", "d.png"):
        _img(root / name)
    (root / "b.png").write_bytes(b"")  # an error row, ready before a's batch is answered
    out = tmp_path / "out.jsonl"
    args = _base(tiny_model_dir, str(root), "-b", "2", "-o", str(out))
    straight = [r["id"] for r in _rows(_run(_base(tiny_model_dir, str(root), "-b", "2")).stdout_bytes)]
    assert len(straight) == 4

    real_answer = TorchBackend.answer

    def ctrl_c(self, requests):
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchBackend, "answer", ctrl_c)
    res = _run(args)
    assert res.exit_code == 130
    assert [r["id"] for r in _rows(out.read_bytes())] == straight[: len(_rows(out.read_bytes()))]
    monkeypatch.setattr(TorchBackend, "answer", real_answer)
    _run(args + ["--resume"])
    assert [r["id"] for r in _rows(out.read_bytes())] == straight


# ----------------------------------------------------------------------------------- 7: output I/O errors


def _deny_writes_under(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only even for root (who ignores permission bits)."""
    prefix = os.fspath(folder) + os.sep
    real_os_open, real_open = os.open, builtins.open

    def denied(path, mode) -> bool:
        return os.fspath(path).startswith(prefix) and mode

    def os_open(path, flags, *a, **kw):
        if isinstance(path, (str, bytes, os.PathLike)) and denied(path, flags & (os.O_WRONLY | os.O_RDWR)):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_os_open(path, flags, *a, **kw)

    def open_(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and denied(file, any(c in mode for c in "wax+")):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("case", ["dev-full", "dev-full-resume", "read-only-dir", "read-only-dir-resume",
                                  "file-in-the-way", "disk-fills-during-run"])
def test_output_io_errors_are_one_line(tmp_path, tiny_model_dir, monkeypatch, case):
    """#7: disk full, read-only folder, a path through a file: one line, exit 2 before work or exit 1 with the
    rows written so far kept (and --resume completing them) -- never a traceback."""
    root = tmp_path / "in"
    for i in range(6):
        _img(root / f"{i}.png", (40 * i, 0, 0))
    resume = ["--resume"] if case.endswith("-resume") else []
    if case.startswith("dev-full"):
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        res = _run(_base(tiny_model_dir, str(root), "-o", "/dev/full", *resume))
        if resume:
            assert res.exit_code == 2, res.output
            _one_error_line(res.stderr, "/dev/full")
        else:
            assert res.exit_code == 1, res.output
            _one_error_line(res.stderr, "No space left on device")
    elif case.startswith("read-only-dir"):
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            _deny_writes_under(monkeypatch, ro)
        res = _run(_base(tiny_model_dir, str(root), "-o", str(ro / "out.jsonl"), *resume))
        ro.chmod(0o755)
        assert res.exit_code == 2 and res.stdout == "", res.output
        _one_error_line(res.stderr, "ermission denied")
    elif case == "file-in-the-way":
        (tmp_path / "file").write_text("x")
        res = _run(_base(tiny_model_dir, str(root), "-o", str(tmp_path / "file" / "out.jsonl")))
        assert res.exit_code == 2 and res.stdout == "", res.output
        _one_error_line(res.stderr, "out.jsonl")
    else:  # a file-size limit stands in for a disk that fills up after two rows
        import resource

        out = tmp_path / "out.jsonl"
        args = _base(tiny_model_dir, str(root), "-b", "1", "-o", str(out))
        assert _run(args).exit_code == 0
        reference = [r["id"] for r in _rows(out.read_bytes())]
        row_bytes = len(out.read_bytes()) // 6

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(row_bytes * 2.5), resource.RLIM_INFINITY))

        out.unlink()
        proc = _m3(args, preexec_fn=limit, timeout=120)
        stderr = proc.stderr.decode()
        assert proc.returncode == 1, stderr
        _one_error_line(stderr, "cannot write")
        assert out.read_bytes().count(b"\n") == 2  # the rows written before the disk filled are kept
        assert _run(args + ["--resume"]).exit_code == 0
        assert [r["id"] for r in _rows(out.read_bytes())] == reference


# ------------------------------------------------------------------------- 10: two writers on one output


def test_second_writer_on_one_output_exits_2(tmp_path, tiny_model_dir):
    """#10: while one run writes -o FILE, a second run on it (a requeued job-array task) stops with one
    line, exit 2, and leaves the file alone; the first run finishes as if alone."""
    images = [_img(tmp_path / f"{i}.png", (50 * i, 0, 0)) for i in range(3)]
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(
        [sys.executable, "-m", "m3cli", *_base(tiny_model_dir, "-", "-b", "1", "-o", str(out), "--resume")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        first.stdin.write(images[0] + b"\n")
        first.stdin.flush()
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().endswith(b"\n")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()
            time.sleep(0.1)
        before = out.read_bytes()
        for extra in (["--resume"], []):
            res = _run(_base(tiny_model_dir, *map(os.fsdecode, images), "-o", str(out), *extra))
            assert res.exit_code == 2 and res.stdout == "", res.output
            _one_error_line(res.stderr, "another m3 batch")
            assert out.read_bytes() == before
        first.stdin.write(b"".join(p + b"\n" for p in images[1:]))
        first.stdin.close()
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["id"] for r in _rows(out.read_bytes())] == [os.fsdecode(p) for p in images]


# -------------------------------------------------------------------- 12: digits independent of batches


def _scenes(folder: Path, n: int = 12) -> list[str]:
    """Varied small scenes made from the shipped examples (rotated, mirrored, dimmed)."""
    rng = random.Random(0)
    examples = [Image.open(EXAMPLES / f"scene-{i}.png").convert("RGB") for i in range(4)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        im = examples[k % 4]
        if k >= 4:
            im = im.rotate(rng.choice([90, 180, 270]))
        if k >= 8:
            im = ImageOps.mirror(im)
        if k >= 12:
            factor = rng.uniform(0.7, 1.2)
            im = im.point(lambda v, f=factor: min(255, int(v * f)))
        path = folder / f"{k:02d}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def test_confidence_digits_do_not_depend_on_batch_composition(tmp_path):
    """#12: the same items in batches of 1 and of 8 (mixed questions, so different padding) give
    byte-identical rows, timings aside."""
    questions = ["what colour is the background?", "how many shapes are there?", "is there a red circle?",
                 "what letter is written?", "what shape is at the top?"]
    rows = "".join(json.dumps({"image": p, "question": questions[(i * 7) % 5]}) + "\n"
                   for i, p in enumerate(_scenes(tmp_path / "scenes")))
    outs = {}
    for b in ("1", "8"):
        res = _run(["batch", "-", "--tokens", "9", "-b", b, "--max-new-tokens", "3", "--model", str(SHIPPED)],
                   input=rows)
        assert res.exit_code == 0, res.output
        outs[b] = TIMINGS.sub(b'"timings":null', res.stdout_bytes).splitlines()
    assert len(outs["1"]) == 12
    assert outs["1"] == outs["8"]


# ------------------------------------------------------------------------------- 14: --shard to stdout


def test_shard_to_stdout_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """#14: --shard K/N -o - is a usage error (exit 2, one line) and writes no stray -.shard.json."""
    image = _img(tmp_path / "a.png").decode()
    monkeypatch.chdir(tmp_path)
    res = _run(_base(tiny_model_dir, image, "--shard", "0/2", "-o", "-"))
    assert res.exit_code == 2 and res.stdout == "", res.output
    _one_error_line(res.stderr, "--shard")
    assert not (tmp_path / "-.shard.json").exists() and not (tmp_path / "-").exists()


# ----------------------------------------------------------------------- budget note, default question


def test_batch_says_once_that_the_budget_was_rounded(tmp_path, tiny_model_dir):
    """#15 (also): m3 batch --tokens 1000 prints the note m3 ask prints, once."""
    images = [_img(tmp_path / f"{i}.png").decode() for i in range(3)]
    res = _run(["batch", *images, "-q", Q, "--tokens", "1000", "--max-new-tokens", "1", "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("--tokens 1000 rounded down to 576") == 1
    assert {r["tokens"] for r in _rows(res.stdout_bytes)} == {576}


def test_default_question_when_none_is_given(tmp_path, tiny_model_dir):
    """#16: without -q (batch) or QUESTION (ask) the documented default is asked and recorded in every row;
    a problem of the whole run (an empty -q) is one line, exit 2, before the model loads."""
    root = tmp_path / "frames"
    for i in range(3):
        _img(root / f"{i}.png", (60 * i, 0, 0))
    res = _run(["batch", str(root), "--auto-scale", "--max-new-tokens", "2", "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    rows = _rows(res.stdout_bytes)
    assert len(rows) == 3 and all(r["error"] is None and r["question"] == "What is this?" for r in rows)

    ask = _run(["ask", str(root / "0.png"), "--json", "--tokens", "9", "--max-new-tokens", "2",
                "--model", str(tiny_model_dir)])
    assert ask.exit_code == 0, ask.output
    assert json.loads(ask.stdout)["question"] == "What is this?"
    for command in ("ask", "batch"):
        assert "What is this?" in " ".join(_run([command, "--help"]).stdout.split())

    for args in (["batch", str(root), "-q", " "], ["ask", str(root / "0.png"), ""]):
        res = _run(args + ["--model", str(tmp_path / "no-such-model")])  # the model would fail to load
        assert res.exit_code == 2 and res.stdout == "", res.output
        _one_error_line(res.stderr, "empty")


# ------------------------------------------------------------------- property: kills, resumes, straight


def _odd_inputs(root: Path) -> bytes:
    """Stdin for a run over bad names, bad files and odd questions (raw bytes: some names are not UTF-8)."""
    r = os.fsencode(root)
    images = [b"a.png", b"b\xff.png", b"c.png", b"d\xfe\xfd.png", b"e.png", b"f.png", b"sub/g.png",
              b"sub/h\xe9.png", b"sub/i.png"]
    for k, name in enumerate(images):
        _img(r + b"/" + name, ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256))
    Path(os.fsdecode(r + b"/empty.png")).write_bytes(b"")
    Path(os.fsdecode(r + b"/bad\x80.jpg")).write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)

    def row(name: bytes, **kw) -> bytes:
        fields = ", ".join(f'"{k}": {json.dumps(v, ensure_ascii=False)}' for k, v in kw.items())
        return b'{"image": "' + r + b"/" + name + b'"' + (b", " + fields.encode() if fields else b"") + b"}\n"

    return b"".join([
        row(b"a.png", question=Q),
        row(b"b\xff.png"),  # raw invalid UTF-8 inside the JSON string; the default question
        r + b"/d\xfe\xfd.png\n",  # a plain path line
        row(b"empty.png", question="how many shapes are there?"),
        row(b"c.png", question='¿qué color? 🔴 "quoted" \\ back\tslash'),
        row(b"missing.png"),
        row(b"bad\x80.jpg", question="is there a red circle?"),
        row(b"e.png", question="what letter is written? " * 12),
        row(b"f.png", question="what colour is the background?", tokens=9),
        row(b"c.png", question=""),  # an empty question: that item's error row
        b"{not json\n",
        r + b"/sub\n",  # a folder: three more images, one with a Latin-1 name
        row(b"a.png", question="what is in the picture?", id="again"),
    ])


def test_random_kills_then_resume_equal_a_straight_run(tmp_path):
    """Property: SIGKILL or Ctrl-C at random moments, each followed by --resume, until the run completes:
    every item exactly once, in input order, byte-identical (timings aside) to a straight run."""
    stdin = _odd_inputs(tmp_path / "in")
    args = ["batch", "-", "--tokens", "1", "-b", "2", "--max-new-tokens", "3", "--model", str(SHIPPED)]
    straight = tmp_path / "straight.jsonl"
    done = _run(args + ["-o", str(straight)], input=stdin)
    assert done.exit_code == 1, done.output  # the bad files and the empty question
    reference = TIMINGS.sub(b'"timings":null', straight.read_bytes())
    assert len(reference.splitlines()) == 15

    rng = random.Random(20261201)
    out = tmp_path / "out.jsonl"
    for kill in (signal.SIGINT, signal.SIGKILL, rng.choice([signal.SIGINT, signal.SIGKILL])):
        _kill_at_random(args + ["-o", str(out), "--resume"], stdin, out, rng, kill)
    final = _run(args + ["-o", str(out), "--resume"], input=stdin)
    assert final.exit_code == 1, final.output
    assert TIMINGS.sub(b'"timings":null', out.read_bytes()) == reference


def _kill_at_random(args: list[str], stdin: bytes | None, out: Path, rng: random.Random, kill) -> None:
    """Start m3 with ``args``, wait until ``out`` holds a few more lines (or the run ends), then send ``kill``."""
    have = out.read_bytes().count(b"\n") if out.exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "m3cli", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.stdin.write(stdin or b"")
    proc.stdin.close()
    wanted = have + rng.randint(1, 3)  # then a random moment a little later: mid-batch, mid-write
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= wanted:
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.15))
    proc.send_signal(kill)
    proc.wait(timeout=60)


SAMPLE_TIMINGS = re.compile(rb'"(prefill_ms|decode_ms|encode_ms|encode_reused)":[^,}]*')


def test_random_kills_then_resume_eval_samples_equal_a_straight_run(tmp_path):
    """Property: m3 eval --samples killed at random moments, each followed by --resume, until it completes: the
    samples file is byte-identical (timings aside) to a straight run's, and so is the report."""
    root = tmp_path / "in"
    scenes = _scenes(root / "img", 6)
    rows = [{"image": p, "question": q, "answer": a}
            for p in scenes for q, a in (("what colour is the background?", "white"), ("how many shapes are there?",
                                                                                        "two"))]
    rows.insert(3, {"image": str(root / "missing.png"), "question": "what is it?", "answer": "x"})  # an error row
    data = root / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--data", str(data), "--tokens", "1,9", "--max-new-tokens", "2", "--batch-size", "1",
            "--model", str(SHIPPED)]
    straight, report = tmp_path / "straight.jsonl", tmp_path / "straight.json"
    assert _run(args + ["--samples", str(straight), "--json", str(report)]).exit_code == 0
    reference = SAMPLE_TIMINGS.sub(rb'"\1":null', straight.read_bytes())
    assert len(reference.splitlines()) == len(rows)

    rng = random.Random(20261207)
    out = tmp_path / "out.jsonl"
    for kill in (signal.SIGKILL, signal.SIGINT, rng.choice([signal.SIGINT, signal.SIGKILL])):
        _kill_at_random(args + ["--samples", str(out), "--resume"], None, out, rng, kill)
    resumed = tmp_path / "resumed.json"
    final = _run(args + ["--samples", str(out), "--resume", "--json", str(resumed)])
    assert final.exit_code == 0, final.output
    assert SAMPLE_TIMINGS.sub(rb'"\1":null', out.read_bytes()) == reference
    for key in ("accuracy", "by_family", "oracle", "calibration"):
        assert json.loads(resumed.read_text())[key] == json.loads(report.read_text())[key], key


def test_random_kills_with_inserted_removed_and_reordered_stdin_rows_answer_each_once(tmp_path):
    """Property: stdin JSONL rows without ids (several about one image), killed at random, then resumed with rows
    inserted, removed and reordered: every row of the final input is answered exactly once, as a straight run of
    that input answers it; the file never holds an id twice."""
    scenes = _scenes(tmp_path / "img", 4)
    questions = ["what colour is the background?", "how many shapes are there?", "is there a red circle?"]
    pool = [{"image": p, "question": q} for p in scenes for q in questions]
    rng = random.Random(20261208)
    first = pool[:8]
    second = [pool[9], *first[:3], *first[4:]]  # a row inserted at the top, one removed
    rng.shuffle(second)  # and the rest reordered
    third = [*second, pool[10], pool[11], pool[3]]  # more rows, the removed one back
    args = ["batch", "-", "--tokens", "1", "-b", "2", "--max-new-tokens", "2", "--model", str(SHIPPED)]
    out = tmp_path / "out.jsonl"
    for rows, kill in ((first, signal.SIGKILL), (second, signal.SIGINT), (third, signal.SIGKILL)):
        stdin = "".join(json.dumps(r) + "\n" for r in rows).encode()
        _kill_at_random(args + ["-o", str(out), "--resume"], stdin, out, rng, kill)
    stdin = "".join(json.dumps(r) + "\n" for r in third)
    assert _run(args + ["-o", str(out), "--resume"], input=stdin).exit_code == 0
    straight = _run(args, input=stdin)
    assert straight.exit_code == 0
    got = _rows(out.read_bytes())
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids))  # each input once
    def masked(row: dict) -> bytes:
        return TIMINGS.sub(b'"timings":null', json.dumps(row, separators=(",", ":")).encode())

    want = {r["id"]: masked(r) for r in _rows(straight.stdout_bytes)}
    have = {r["id"]: masked(r) for r in got}
    assert have == want  # the final input's rows, each as a straight run makes it (the removed one came back)
