"""Every file m3 writes goes through one output guard, and every resume is keyed by content: one test per defect
(numbered as in the defect list this suite answers), then the README's shard one-liner on a small input.

The guard: checked before any work (folder exists and takes a file, not an input of the run, an existing file
replaced only with --overwrite or completed with --resume), locked while written, written atomically or
appended in order, one-line errors (exit 2 before work, exit 1 with what is done kept).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

from cli_helpers import one_error_line as _one_error_line
from cli_helpers import png as _img
from cli_helpers import rows as _rows
from cli_helpers import run_cli as _run
from cli_helpers import run_m3 as _m3

Q = "what colour is the background?"
TIMINGS = re.compile(r'"(timings|prefill_ms|decode_ms|encode_ms|encode_reused)":(\{[^{}]*\}|[^,}]*)')


def _masked(text: str) -> str:
    return TIMINGS.sub(r'"\1":null', text)


def _batch(model, *extra):
    return ["batch", "-q", Q, "--tokens", "1", "--max-new-tokens", "1", "--model", model, *extra]


def _data(folder: Path, rows: list[dict], name: str = "q.jsonl") -> Path:
    """An eval data file over small images in ``folder/img`` (created on demand, colour from the name)."""
    for row in rows:
        image = folder / row["image"]
        if not image.exists() and not row.get("_missing"):
            _img(image, (sum(map(ord, row["image"])) % 256, 60, 90))
    path = folder / name
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n" for r in rows))
    return path


ROWS = [{"image": "img/a.png", "question": "what colour is the background?", "answer": "red"},
        {"image": "img/b.png", "question": "how many shapes are there?", "answer": "two"},
        {"image": "img/a.png", "question": "is there a circle?", "answer": "yes"},
        {"image": "img/c.png", "question": "what colour is the background?", "answer": "blue"}]


def _eval(model, data, *extra):
    # batch size 1: answers that cannot depend on which rows shared a batch, so runs compare exactly
    return ["eval", "--data", data, "--tokens", "1,9", "--max-new-tokens", "1", "--batch-size", "1", "--model", model,
            *extra]


def _unwritable(folder: Path, monkeypatch) -> Path:
    """A folder no file can be made in, even for root (who ignores permission bits)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        prefix = os.fspath(folder) + os.sep
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, flags, *a, **kw):
            if os.fspath(path).startswith(prefix) and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(30, "Read-only file system", os.fspath(path))
            return real_os_open(path, flags, *a, **kw)

        def open_(file, mode="r", *a, **kw):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(prefix) and \
                    any(c in mode for c in "wax+"):
                raise OSError(30, "Read-only file system", os.fspath(file))
            return real_open(file, mode, *a, **kw)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
    return folder


# ------------------------------------------------------------------------------------- data loss, wrong results


def test_01_eval_resume_refuses_a_file_that_is_not_samples(tmp_path, tiny_model_dir):
    data = _data(tmp_path, ROWS)
    other = tmp_path / "f.csv"
    other.write_text("image,question,answer\na.png,what?,red\n")
    before = other.read_bytes()
    res = _run(_eval(tiny_model_dir, data, "--samples", other, "--resume"))
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "not m3 eval samples")
    assert other.read_bytes() == before


def test_02_the_data_file_is_never_the_samples_file(tmp_path, tiny_model_dir):
    data = _data(tmp_path / "d", ROWS, "self.jsonl")
    before = data.read_bytes()
    for extra in ([], ["--overwrite"], ["--resume"]):
        res = _run(_eval(tiny_model_dir, data, "--samples", data, *extra))
        assert res.exit_code == 2, res.output
        _one_error_line(res.stderr, "also an input of this run")
        assert data.read_bytes() == before


def _stdin(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_03_stdin_rows_without_id_resume_by_content(tmp_path, tiny_model_dir):
    """Rows sharing an image, a new row put first: --resume answers the new one, and no other twice."""
    a, b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png", (0, 0, 200))
    first = [{"image": str(a), "question": "what colour is the background?"},
             {"image": str(a), "question": "how many shapes are there?"},
             {"image": str(b), "question": "what colour is the background?"}]
    out = tmp_path / "out.jsonl"
    args = ["batch", "-", "--tokens", "1", "--max-new-tokens", "1", "--model", tiny_model_dir, "-o", out]
    assert _run(args, input=_stdin(first)).exit_code == 0
    new = {"image": str(a), "question": "is there a circle?"}
    res = _run(args + ["--resume"], input=_stdin([new, *first]))
    assert res.exit_code == 0, res.output
    rows = _rows(out.read_text())
    asked = [(r["source"], r["question"]) for r in rows]
    assert sorted(asked) == sorted((r["image"], r["question"]) for r in [new, *first])  # each exactly once
    assert len({r["id"] for r in rows}) == len(rows)
    straight = _run(args[:-2], input=_stdin([new, *first]))
    assert {r["id"]: (r["question"], r["answer"]) for r in _rows(straight.stdout)} == \
        {r["id"]: (r["question"], r["answer"]) for r in rows}


def test_04_eval_resume_matches_samples_by_content(tmp_path, tiny_model_dir):
    """A row inserted at the top shifts every default id <stem>:<line>: resumed rows keep their samples, the new
    row is evaluated, a changed answer or image is evaluated again; the report equals a fresh run's."""
    data = _data(tmp_path, ROWS)
    samples = tmp_path / "s.jsonl"
    assert _run(_eval(tiny_model_dir, data, "--samples", samples)).exit_code == 0
    changed = [{"image": "img/d.png", "question": "what shape is at the top?", "answer": "circle"},  # inserted
               dict(ROWS[0]),
               {**ROWS[1], "answer": "three"},  # a changed gold
               {**ROWS[2], "image": "img/e.png"},  # another image
               dict(ROWS[3])]
    data = _data(tmp_path, changed)
    report = tmp_path / "r.json"
    res = _run(_eval(tiny_model_dir, data, "--samples", samples, "--resume", "--json", report))
    assert res.exit_code == 0, res.output
    summary = json.loads(report.read_text())
    assert (summary["resumed"], summary["computed"]) == (2, 3)
    fresh = tmp_path / "fresh.json"
    assert _run(_eval(tiny_model_dir, data, "--json", fresh)).exit_code == 0
    fresh = json.loads(fresh.read_text())
    for key in ("accuracy", "oracle"):
        assert summary[key] == fresh[key], key
    lines = _rows(samples.read_text())
    latest = {}
    for line in lines:
        latest[line["key"]] = line
    by_question = {(s["question"], tuple(s["gold"]), s["image"]) for s in latest.values()}
    assert ("how many shapes are there?", ("three",), str(tmp_path / "img/b.png")) in by_question
    assert ("is there a circle?", ("yes",), str(tmp_path / "img/e.png")) in by_question


def _shards(tmp_path, model, images, questions_by_shard, n=2):
    outs = []
    for k in range(n):
        out = tmp_path / "out" / f"shard-{k}.jsonl"
        res = _run(["batch", *images, "-q", questions_by_shard[k], "--tokens", "1", "--max-new-tokens", "1",
                    "--model", model, "--shard", f"{k}/{n}", "-o", out])
        assert res.exit_code == 0, res.output
        outs.append(out)
    return outs


def test_05_merge_refuses_shards_of_different_runs(tmp_path, tiny_model_dir):
    images = [str(_img(tmp_path / f"{i}.png", (50 * i, 0, 0))) for i in range(4)]
    outs = _shards(tmp_path, tiny_model_dir, images, [Q, "how many shapes are there?"])
    merged = tmp_path / "all.jsonl"
    res = _run(["merge", *outs, "-o", merged])
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "shards of different runs")
    assert "question" in res.stderr and not merged.exists()
    # an empty shard (no item fell in it) of another run is caught by its sidecar's run record
    empty = None
    for k in range(8):
        out = tmp_path / "e" / f"s{k}.jsonl"
        assert _run(_batch(tiny_model_dir, images[0], "--shard", f"{k}/8", "-o", out)).exit_code == 0
        if not out.read_bytes():
            empty = (k, out)
            break
    k, out = empty
    other = tmp_path / "e" / "other.jsonl"
    assert _run(["batch", images[0], "-q", "is there a circle?", "--tokens", "1", "--max-new-tokens", "1",
                 "--model", tiny_model_dir, "--shard", f"{(k + 1) % 8}/8", "-o", other]).exit_code == 0
    res = _run(["merge", out, other, "-o", merged])
    assert res.exit_code == 2 and "shards of different runs" in res.stderr, res.output


def test_06_samples_inside_the_data_folder_are_refused(tmp_path, tiny_model_dir):
    data = _data(tmp_path / "d", ROWS)
    res = _run(_eval(tiny_model_dir, data.parent, "--samples", data.parent / "s.jsonl"))
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "inside the input folder")
    assert not (data.parent / "s.jsonl").exists()
    assert _run(_eval(tiny_model_dir, data.parent, "--samples", tmp_path / "s.jsonl")).exit_code == 0


def test_07_samples_are_locked_while_written(tmp_path, tiny_model_dir):
    from m3cli.eval.datarun import DataOptions, open_samples

    data = _data(tmp_path, ROWS)
    samples = tmp_path / "s.jsonl"
    holder = open_samples(DataOptions([1], samples=str(samples)))  # another run, writing
    try:
        for extra in ([], ["--resume"]):
            res = _run(_eval(tiny_model_dir, data, "--samples", samples, *extra))
            assert res.exit_code == 2, res.output
            _one_error_line(res.stderr, "being written by another m3 eval run")
    finally:
        holder.close()
    assert _run(_eval(tiny_model_dir, data, "--samples", samples, "--overwrite")).exit_code == 0


def test_batch_output_holding_results_is_never_replaced_silently(tmp_path, tiny_model_dir):
    image = str(_img(tmp_path / "a.png"))
    out = tmp_path / "answers.jsonl"
    assert _run(_batch(tiny_model_dir, image, "-o", out)).exit_code == 0
    before = out.read_bytes()
    res = _run(_batch(tiny_model_dir, image, "-o", out))
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "--resume completes it, --overwrite replaces it")
    assert out.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    res = _run(_batch(tiny_model_dir, image, "-o", notes))
    assert res.exit_code == 2 and notes.read_text() == "mine\n", res.output
    _one_error_line(res.stderr, "was not written by m3 batch")
    assert _run(_batch(tiny_model_dir, image, "-o", out, "--overwrite")).exit_code == 0
    assert len(_rows(out.read_text())) == 1


def test_merge_never_writes_an_empty_output_when_it_fails(tmp_path, tiny_model_dir):
    image = str(_img(tmp_path / "a.png"))
    empty = None
    for k in range(8):  # a shard that got no item, merged alone: shards are missing, nothing to write
        out = tmp_path / f"s{k}.jsonl"
        assert _run(_batch(tiny_model_dir, image, "--shard", f"{k}/8", "-o", out)).exit_code == 0
        if not out.read_bytes():
            empty = out
            break
    merged = tmp_path / "all.jsonl"
    res = _run(["merge", empty, "-o", merged])
    assert res.exit_code == 1 and "nothing written" in res.stderr, res.output
    assert not merged.exists()
    plain = tmp_path / "plain.jsonl"
    assert _run(_batch(tiny_model_dir, image, "-o", plain)).exit_code == 0
    res = _run(["merge", plain, "-o", merged])
    assert res.exit_code == 2 and not merged.exists(), res.output


def test_merge_never_overwrites_one_of_its_inputs(tmp_path, tiny_model_dir):
    images = [str(_img(tmp_path / f"{i}.png", (60 * i, 0, 0))) for i in range(3)]
    outs = _shards(tmp_path, tiny_model_dir, images, [Q, Q])
    before = [p.read_bytes() for p in outs]
    for target in (outs[0], Path(str(outs[1]) + ".shard.json")):
        res = _run(["merge", *outs, "-o", target, "--overwrite"])
        assert res.exit_code == 2, res.output
        _one_error_line(res.stderr, "also an input of this run")
    assert [p.read_bytes() for p in outs] == before


def test_readme_shard_one_liner_works_on_a_small_input(tmp_path, tiny_model_dir, monkeypatch):
    """The README's shard line, run as written (on the tiny model, one-token answers), on 2 images over 8 shards
    (most shards empty): exit 0 and the straight run's rows."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "--shard $k/8" in ln)
    frames = tmp_path / "frames"
    for i in range(2):
        _img(frames / f"{i}.png", (90 * i, 20, 0))
    quick = f"--model {tiny_model_dir} --max-new-tokens 1"
    script = (f'm3() {{ if [ "$1" = batch ]; then "{sys.executable}" -m m3cli "$@" {quick}; '
              f'else "{sys.executable}" -m m3cli "$@"; fi; }}\n{line}\n')
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert sum(1 for p in (tmp_path / "out").glob("*.jsonl") if not p.read_bytes()) >= 5  # empty shards: valid
    monkeypatch.chdir(tmp_path)
    straight = _run(["batch", "./frames", "-q", "...", "--model", tiny_model_dir, "--max-new-tokens", "1"])
    assert _masked((tmp_path / "all.jsonl").read_text()) == _masked(straight.stdout)


# ------------------------------------------------------------------------------ crashes and wrong messages


def test_16_convert_onto_a_read_only_location_is_one_line_before_work(tmp_path, monkeypatch):
    ro = _unwritable(tmp_path / "ro", monkeypatch)
    src = Path(__file__).resolve().parent.parent / "models" / "m3-shapes"
    for args in (["convert", src, "--to", "hf", ro / "out"], ["convert", src, "--to", "gguf", ro / "out"],
                 ["convert", "--fix-mmproj", src / "config.json", ro]):
        res = _run(args)
        assert res.exit_code == 2, res.output
        _one_error_line(res.stderr, "Read-only file system")
    ro.chmod(0o755)


def test_17_samples_on_a_full_disk_is_one_line_and_keeps_what_is_done(tmp_path, tiny_model_dir):
    import resource

    data = _data(tmp_path, ROWS)
    samples = tmp_path / "s.jsonl"
    assert _run(_eval(tiny_model_dir, data, "--samples", samples, "--batch-size", "1")).exit_code == 0
    line = max(len(x) for x in samples.read_bytes().splitlines())
    samples.unlink()

    def limit():  # a file-size limit stands in for a disk that fills up after the first line
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(line * 1.5), resource.RLIM_INFINITY))

    proc = _m3(_eval(tiny_model_dir, data, "--samples", samples, "--batch-size", "1"), preexec_fn=limit, timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    _one_error_line(stderr, "cannot write")
    kept = samples.read_bytes()
    assert kept.count(b"\n") >= 1  # the lines written before the disk filled stay (a cut last line is repaired)
    res = _run(_eval(tiny_model_dir, data, "--samples", samples, "--resume", "--batch-size", "1"))
    assert res.exit_code == 0, res.output
    assert len({s["key"] for s in _rows(samples.read_text())}) == len(ROWS)


def test_18_reports_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    data = _data(tmp_path, ROWS)
    no_model = tmp_path / "no-such-model"  # were the outputs checked after loading, this would be the error
    missing = tmp_path / "nonexistent" / "r.json"
    for flag, path, needle in (("--json", missing, "does not exist"), ("--plot", missing.with_suffix(".png"),
                                                                       "does not exist")):
        res = _run(["eval", "--data", data, flag, path, "--model", no_model])
        assert res.exit_code == 2, res.output
        _one_error_line(res.stderr, needle)
        assert not missing.parent.exists()
    ro = _unwritable(tmp_path / "ro", monkeypatch)
    res = _run(["eval", "--data", data, "--json", ro / "r.json", "--model", no_model])
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "Read-only file system")
    ro.chmod(0o755)
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}\n')
    res = _run(["eval", "--data", data, "--json", mine, "--model", no_model])
    assert res.exit_code == 2 and "not written by m3" in res.stderr, res.output
    assert mine.read_text() == '{"my": "notes"}\n'


def test_reports_replace_their_own_earlier_report(tmp_path, tiny_model_dir):
    data = _data(tmp_path, ROWS)
    report, plot = tmp_path / "r.json", tmp_path / "acc.png"
    for _ in range(2):  # an eval run again rewrites its own report and plot
        res = _run(_eval(tiny_model_dir, data, "--json", report, "--plot", plot))
        assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["scales"] == [1, 9]
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_26_convert_to_hf_follows_the_umask(tmp_path):
    import real_layouts as rl

    original = rl.build_original_llava(tmp_path / "original")
    out = tmp_path / "hf"
    old = os.umask(0o022)
    try:
        res = _run(["convert", original.model_dir, "--to", "hf", out])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
