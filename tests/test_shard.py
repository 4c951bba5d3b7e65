"""--shard K/N and m3 merge: stable assignment, sidecars, merging back to the single-process output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from m3cli.engines.shard import (
    IndexingSink,
    MergeError,
    ShardSelector,
    add_index,
    merge_outputs,
    parse_shard,
    read_sidecar,
    shard_of,
    top_level_id,
    write_sidecar,
)
from m3cli.output import JsonlSink, make_row

N = 3


# --------------------------------------------------------------------------------------- parse / hash


@pytest.mark.parametrize(
    ("spec", "want"), [("0/1", (0, 1)), ("0/4", (0, 4)), ("3/4", (3, 4)), (" 2/3 ", (2, 3)), ("07/10", (7, 10))]
)
def test_parse_shard_good(spec, want):
    assert parse_shard(spec) == want


@pytest.mark.parametrize(
    "spec", ["3/2", "2/2", "a/b", "1", "-1/3", "1/0", "0/0", "", "1/3/4", "1 / 3x", "½/2", "1.0/3"]
)
def test_parse_shard_bad(spec):
    with pytest.raises(ValueError, match="expected K/N") as err:
        parse_shard(spec)
    assert "\n" not in str(err.value)


IDS = ["a.png", "photos/b.jpg", "clip.mp4", "ünïcode/图.png", "x" * 300, ""]


def test_shard_of_stable_across_processes():
    code = (
        "import json, sys; from m3cli.engines.shard import shard_of; "
        "ids = json.loads(sys.argv[1]); print(json.dumps([[shard_of(i, n) for n in (1, 2, 3, 7, 1000)] for i in ids]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(IDS)], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert json.loads(out) == [[shard_of(i, n) for n in (1, 2, 3, 7, 1000)] for i in IDS]
    # pinned values: a change of hash would silently reshuffle every existing job array
    assert [shard_of(i, 1000) for i in IDS[:3]] == PINNED


PINNED = [982, 488, 793]  # blake2b(id, digest_size=8), big-endian, mod 1000


def test_shard_of_balanced_and_independent_of_other_ids():
    ids = [f"img/{i:05d}.png" for i in range(1000)]
    counts = [0] * N
    for i in ids:
        counts[shard_of(i, N)] += 1
    assert all(250 <= c <= 420 for c in counts), counts
    before = {i: shard_of(i, N) for i in ids[:100]}
    more = ids[:100] + [f"new/{i}.png" for i in range(50)]
    assert {i: shard_of(i, N) for i in more if i in before} == before


def test_shards_cover_every_id_once():
    ids = [f"v{i}.mp4" for i in range(200)]
    taken = [[i for i in ids if shard_of(i, N) == k] for k in range(N)]
    assert sorted(sum(taken, [])) == sorted(ids)
    assert shard_of("a.png", 1) == 0
    with pytest.raises(ValueError):
        shard_of("a.png", 0)


# ---------------------------------------------------------------------------------------------- merge


def _full_run() -> list[tuple[int, dict]]:
    """(input_index, row) of a single-process run, in its output order."""
    out: list[tuple[int, dict]] = []
    index = 0
    for i in range(12):
        out.append(
            (
                index,
                make_row(
                    id=f"img{i}.png",
                    source=f"img{i}.png",
                    answer=f"a{i}",
                    tokens=9,
                    confidence=0.5,
                    timings={"encode_ms": 1.0},
                ),
            )
        )
        index += 1
        if i % 4 == 1:  # a video: frames together, in frame order
            vid = f"clip{i}.mp4"
            for f in (0, 5, 10):
                out.append((index, make_row(id=f"{vid}#{f}", source=vid, frame=f, time_s=f / 5, answer="ü 图")))
            if i == 5:  # damaged part-way: its own error row comes after the frames it managed
                out.append((index, make_row(id=vid, source=vid, error="clip5.mp4: corrupt packet")))
            index += 1
    out.append((index, make_row(id="missing.png", source="missing.png", error="missing.png: file not found")))
    return out


def _jsonl(rows) -> str:
    buf = io.StringIO()
    sink = JsonlSink(buf)
    for row in rows:
        sink.write(row)
    return buf.getvalue()


def _shard_key(row: dict) -> str:
    return top_level_id(row)


def _write_shards(tmp_path, full, complete=True, shards=range(N)):
    """Shard files as N sharded runs would write them (each in input order), with sidecars."""
    inputs = full[-1][0] + 1
    paths = []
    for k in range(N):
        rows = [add_index(r, i) for i, r in full if shard_of(_shard_key(r), N) == k]
        assert rows, "every shard gets some rows in this fixture"
        path = tmp_path / f"shard-{k}.jsonl"
        path.write_text(_jsonl(rows), encoding="utf-8")
        if k in shards:
            write_sidecar(path, k, N, inputs, complete)
        paths.append(str(path))
    return paths


def test_merge_gives_single_process_output(tmp_path):
    full = _full_run()
    paths = _write_shards(tmp_path, full)
    out = tmp_path / "all.jsonl"
    report = merge_outputs(list(reversed(paths)), str(out))
    assert out.read_bytes() == _jsonl(r for _, r in full).encode("utf-8")
    assert "input_index" not in out.read_text(encoding="utf-8")
    assert report.exact and report.checked
    assert report.rows_written == len(full)
    assert report.summary() == f"merged {len(full)} rows from 3 shards; no duplicated ids; missing: none"
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_to_stdout(tmp_path, capsys):
    full = _full_run()
    merge_outputs(_write_shards(tmp_path, full), None)
    assert capsys.readouterr().out == _jsonl(r for _, r in full)


def test_duplicates_last_row_wins(tmp_path):
    full = _full_run()
    paths = _write_shards(tmp_path, full)
    k = shard_of("img3.png", N)
    retry = add_index(make_row(id="img3.png", source="img3.png", answer="second"), 3)
    with open(paths[k], "a", encoding="utf-8") as f:
        f.write(_jsonl([retry]))
    other = tmp_path / "rerun.jsonl"  # the same row again in another file, given last
    retry2 = add_index(make_row(id="img3.png", source="img3.png", answer="third"), 3)
    other.write_text(_jsonl([retry2]), encoding="utf-8")
    out = tmp_path / "all.jsonl"
    report = merge_outputs(paths + [str(other)], str(out))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for _, r in full]
    assert next(r for r in rows if r["id"] == "img3.png")["answer"] == "third"
    assert report.duplicates == {"img3.png": 3}
    assert not report.exact
    assert "1 duplicated id (img3.png)" in report.summary()
    assert "rerun.jsonl (no .shard.json sidecar)" in report.summary()


def test_half_written_last_line_ignored_and_file_untouched(tmp_path):
    full = _full_run()
    paths = _write_shards(tmp_path, full)
    k = shard_of("img0.png", N)
    partial = _jsonl([add_index(make_row(id="img0.png", source="img0.png", answer="late"), 0)]).rstrip("\n")
    with open(paths[k], "a", encoding="utf-8") as f:
        f.write(partial[:-1] if k % 2 else partial)  # invalid or merely unterminated: both ignored
    before = open(paths[k], "rb").read()
    out = tmp_path / "all.jsonl"
    report = merge_outputs(paths, str(out))
    assert open(paths[k], "rb").read() == before
    assert out.read_bytes() == _jsonl(r for _, r in full).encode("utf-8")
    assert report.skipped_lines == 1 and report.exact


def test_missing_shard_incomplete_sidecar_missing_index(tmp_path):
    full = _full_run()
    paths = _write_shards(tmp_path, full, shards=[0, 1, 2])
    write_sidecar(paths[1], 1, N, full[-1][0] + 1, complete=False)
    dropped = paths.pop(2)
    owned = sorted({i for i, r in full if shard_of(_shard_key(r), N) == 2})
    # and one input of shard 0 lost its row
    lines = open(paths[0], encoding="utf-8").read().splitlines(keepends=True)
    lost = json.loads(lines[0])["input_index"]
    lost_rows = [ln for ln in lines if json.loads(ln)["input_index"] == lost]
    open(paths[0], "w", encoding="utf-8").write("".join(ln for ln in lines if ln not in lost_rows))
    report = merge_outputs(paths, str(tmp_path / "all.jsonl"))
    assert report.missing_shards == [2]
    assert report.incomplete_shards == [1]
    assert report.missing == [f"input #{i} (no row)" for i in sorted(owned + [lost])]
    assert not report.exact
    summary = report.summary()
    assert "missing: shard 2, input #" in summary and "incomplete shards: 1" in summary
    assert os.path.exists(dropped)


def test_without_sidecars_gaps_reported_and_not_exact(tmp_path):
    full = _full_run()
    paths = _write_shards(tmp_path, full, shards=[])
    report = merge_outputs(paths[:1], str(tmp_path / "all.jsonl"))
    assert not report.checked and not report.exact
    assert report.missing and all(m.startswith("input #") for m in report.missing)
    assert "unchecked" in report.summary()


def test_rows_without_input_index_refused(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(_jsonl([make_row(id="a.png", source="a.png", answer="x")]), encoding="utf-8")
    out = tmp_path / "all.jsonl"
    with pytest.raises(MergeError, match="plain.jsonl:1: .*input_index") as err:
        merge_outputs([str(plain)], str(out))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_sidecars_of_different_runs_refused(tmp_path):
    paths = _write_shards(tmp_path, _full_run())
    write_sidecar(paths[1], 1, 4, 17, True)
    with pytest.raises(MergeError, match="different runs"):
        merge_outputs(paths, str(tmp_path / "all.jsonl"))


def test_sidecar_roundtrip(tmp_path):
    out = tmp_path / "sub" / "shard-1.jsonl"
    assert read_sidecar(out) is None
    path = write_sidecar(out, 1, 4, 120, False)
    assert path == str(out) + ".shard.json"
    assert read_sidecar(out) == {"shard": 1, "of": 4, "inputs": 120, "complete": False}
    write_sidecar(out, 1, 4, 120, True)
    assert read_sidecar(out)["complete"] is True
    assert os.listdir(tmp_path / "sub") == ["shard-1.jsonl.shard.json"]
    (tmp_path / "sub" / "shard-1.jsonl.shard.json").write_text("{}")
    with pytest.raises(ValueError, match="not a shard sidecar"):
        read_sidecar(out)


# ------------------------------------------------------------------------------- selector (wiring aid)


def test_selector_and_indexing_sink():
    items = [SimpleNamespace(id=f"f{i}.png") for i in range(30)] + [SimpleNamespace(id="v.mp4")]
    ends = []
    picked = {k: list(ShardSelector(items, k, N, on_end=ends.append)) for k in range(N)}
    assert ends == [31] * N
    assert sorted(i.id for k in picked for i in picked[k]) == sorted(i.id for i in items)
    k = shard_of("v.mp4", N)
    sel = ShardSelector(items, k, N)
    assert sel.total is None
    list(sel)
    assert sel.total == 31
    buf = io.StringIO()
    sink = IndexingSink(JsonlSink(buf), sel)
    frame = make_row(id="v.mp4#4", source="v.mp4", frame=4)
    sink.write(frame)
    sink.close()
    assert json.loads(buf.getvalue())["input_index"] == 30
    assert "input_index" not in frame  # add_index copies
    with pytest.raises(KeyError):
        sel.index_of(make_row(id=next(i.id for i in items if shard_of(i.id, N) != k)))
