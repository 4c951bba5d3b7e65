"""Output rows: ordering, sinks, JSONL resume/repair, summary line."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest

from m3cli.output import (
    ROW_KEYS,
    CsvSink,
    JsonlSink,
    OrderedWriter,
    RowSink,
    Summary,
    TextSink,
    make_row,
    open_sink,
    read_done_ids,
    repair_jsonl,
)


class RecordingSink:
    """Records every call, so tests can see when a row was written and whether it was flushed."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def write(self, row):
        self.events.append(("write", row["id"]))

    def flush(self):
        self.events.append(("flush", None))

    def close(self):
        self.events.append(("close", None))

    @property
    def ids(self):
        return [v for e, v in self.events if e == "write"]


def row(i, **kw):
    return make_row(id=f"item{i}", answer=f"a{i}", tokens=9, confidence=0.5, **kw)


# ------------------------------------------------------------------------------------------ make_row


def test_make_row_fills_keys_in_order():
    r = make_row(id="x", answer="yes")
    assert tuple(r) == ROW_KEYS
    assert r["id"] == "x" and r["answer"] == "yes"
    assert all(r[k] is None for k in ROW_KEYS if k not in ("id", "answer"))


def test_make_row_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        make_row(id="x", bogus=1)


def test_make_row_error_is_one_line():
    assert make_row(id="x", error="boom\n  at line 3\tfoo")["error"] == "boom at line 3 foo"
    assert make_row(id="x", error="")["error"] == "unknown error"


# ------------------------------------------------------------------------------------ OrderedWriter


def test_rows_written_and_flushed_as_soon_as_predecessors_done():
    sink = RecordingSink()
    w = OrderedWriter(sink)
    w.put(2, row(2))
    w.put(1, row(1))
    assert sink.events == [] and w.pending == 2
    w.put(0, row(0))
    # All three released at once, each followed by its own flush, before close.
    assert sink.events == [
        ("write", "item0"),
        ("flush", None),
        ("write", "item1"),
        ("flush", None),
        ("write", "item2"),
        ("flush", None),
    ]
    assert w.pending == 0
    w.put(3, row(3))
    assert sink.events[-2:] == [("write", "item3"), ("flush", None)]
    assert w.close() == []
    assert sink.events[-1] == ("close", None)


def test_random_order_comes_out_in_order():
    order = list(range(200))
    random.Random(0).shuffle(order)
    sink = RecordingSink()
    w = OrderedWriter(sink)
    for seq in order:
        w.put(seq, row(seq))
    assert sink.ids == [f"item{i}" for i in range(200)]
    assert w.close() == []


def test_skip_lets_rows_flow():
    sink = RecordingSink()
    w = OrderedWriter(sink)
    w.put(1, row(1))
    w.skip(2)
    w.put(3, row(3))
    assert sink.ids == []
    w.skip(0)
    assert sink.ids == ["item1", "item3"]
    assert w.next_seq == 4 and w.pending == 0


def test_pending_bounded_by_window():
    # Results arrive at most `window` places early: the buffer never holds more than that.
    window, n = 5, 100
    rng = random.Random(1)
    sink = RecordingSink()
    w = OrderedWriter(sink, max_pending=window)
    order = []
    for start in range(0, n, window + 1):
        chunk = list(range(start, min(start + window + 1, n)))
        rng.shuffle(chunk)
        order += chunk
    peak = 0
    for seq in order:
        w.put(seq, row(seq))
        peak = max(peak, w.pending)
    assert peak <= window
    assert len(sink.ids) == n


def test_max_pending_overflow():
    w = OrderedWriter(RecordingSink(), max_pending=2)
    w.put(1, row(1))
    w.put(2, row(2))
    with pytest.raises(OverflowError):
        w.put(3, row(3))
    w.put(0, row(0))  # the awaited one is always accepted
    assert w.pending == 0


def test_duplicate_and_closed():
    w = OrderedWriter(RecordingSink())
    w.put(0, row(0))
    w.put(2, row(2))
    with pytest.raises(ValueError):
        w.put(0, row(0))
    with pytest.raises(ValueError):
        w.skip(2)
    with pytest.raises(ValueError):
        w.put(-1, row(9))
    w.close()
    with pytest.raises(RuntimeError):
        w.put(5, row(5))


def test_close_with_gaps_writes_buffered_rows_and_reports_missing():
    sink = RecordingSink()
    w = OrderedWriter(sink)
    w.put(0, row(0))
    w.put(2, row(2))
    w.skip(4)
    w.put(5, row(5))
    assert sink.ids == ["item0"]
    assert w.close() == [1, 3]
    assert sink.ids == ["item0", "item2", "item5"]
    assert sink.events[-1] == ("close", None)
    assert w.close() == []


# --------------------------------------------------------------------------------------------- sinks


def full_row(**kw):
    base = dict(
        id="img-é/1",
        source="photos/é.jpg",
        frame=None,
        time_s=1.5,
        question="какой цвет?",
        answer="красный 🔴",
        confidence=0.875,
        tokens=9,
        scales_tried=[{"scale": 1, "tokens": 1}, {"scale": 3, "tokens": 9}],
        model="m3-7b",
        backend="torch",
        timings={"encode_s": 0.1},
        error=None,
    )
    base.update(kw)
    return make_row(**base)


def test_sinks_satisfy_protocol():
    for cls in (JsonlSink, CsvSink, TextSink):
        assert isinstance(cls(io.StringIO()), RowSink)


def test_jsonl_format():
    buf = io.StringIO()
    sink = JsonlSink(buf)
    r = full_row()
    sink.write(r)
    sink.write(full_row(id="b", answer=None, confidence=float("nan"), error="oom"))
    sink.close()
    text = buf.getvalue()
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert "красный 🔴" in lines[0] and '"frame":null' in lines[0] and ", " not in lines[0]
    assert json.loads(lines[0]) == r
    assert list(json.loads(lines[0])) == list(ROW_KEYS)
    second = json.loads(lines[1])
    assert second["confidence"] is None and second["answer"] is None and second["error"] == "oom"
    assert not buf.closed  # stream not owned: left open


def test_csv_format():
    buf = io.StringIO()
    sink = CsvSink(buf)
    sink.write(full_row())
    sink.write(full_row(id="b", answer='say "hi",\nthen', tokens=None, scales_tried=None, error="x"))
    sink.close()
    text = buf.getvalue()
    assert text.startswith(",".join(ROW_KEYS) + "\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2
    a, b = rows
    assert a["question"] == "какой цвет?" and a["answer"] == "красный 🔴"
    assert a["frame"] == "" and a["error"] == "" and a["tokens"] == "9"
    assert json.loads(a["scales_tried"]) == [{"scale": 1, "tokens": 1}, {"scale": 3, "tokens": 9}]
    assert json.loads(a["timings"]) == {"encode_s": 0.1}
    assert b["answer"] == 'say "hi",\nthen' and b["tokens"] == "" and b["scales_tried"] == ""


def test_csv_empty_run_still_has_header():
    buf = io.StringIO()
    CsvSink(buf).close()
    assert buf.getvalue() == ",".join(ROW_KEYS) + "\n"


def test_text_format():
    buf = io.StringIO()
    sink = TextSink(buf)
    sink.write(full_row(answer="red\nand blue"))
    sink.write(full_row(id="b", answer=None, tokens=None, confidence=None, error="decode failed"))
    sink.write(full_row(id="c", tokens=4, confidence=None))
    sink.close()
    assert buf.getvalue().splitlines() == [
        "img-é/1\tred and blue\t[9 tok, conf 0.88]",
        "b\tERROR: decode failed",
        "c\tкрасный 🔴\t[4 tok]",
    ]


def test_open_sink_csv_append_no_repeated_header(tmp_path):
    path = tmp_path / "sub" / "out.csv"
    s = open_sink("csv", str(path), append=True)  # new file (parent created): header
    s.write(full_row(id="a"))
    s.close()
    s = open_sink("csv", str(path), append=True)
    s.write(full_row(id="b"))
    s.close()
    text = path.read_text(encoding="utf-8")
    assert text.count("id,source,") == 1
    assert [r["id"] for r in csv.DictReader(io.StringIO(text))] == ["a", "b"]
    s = open_sink("csv", str(path), append=False)  # overwrite: header again
    s.close()
    assert path.read_text(encoding="utf-8") == ",".join(ROW_KEYS) + "\n"


def test_open_sink_text_append_starts_new_line(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("a\tpartial", encoding="utf-8")
    s = open_sink("text", str(path), append=True)
    s.write(full_row(id="b", tokens=None, confidence=None))
    s.close()
    assert path.read_text(encoding="utf-8").splitlines() == ["a\tpartial", "b\tкрасный 🔴"]


def test_open_sink_stdout_not_closed(capsys):
    s = open_sink("jsonl", None, append=False)
    s.write(make_row(id="x"))
    s.close()
    assert json.loads(capsys.readouterr().out)["id"] == "x"


def test_open_sink_bad_format():
    with pytest.raises(ValueError):
        open_sink("xml", None, append=False)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- resume


def jl(**kw) -> bytes:
    return (json.dumps(make_row(**kw), ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def test_read_done_ids_complete_file(tmp_path):
    path = tmp_path / "out.jsonl"
    data = jl(id="a") + b"\n" + jl(id="b", error="x") + b"  \n" + jl(id="c")
    path.write_bytes(data)
    assert read_done_ids(path) == {"a", "b", "c"}
    assert path.read_bytes() == data  # nothing to repair


def test_read_done_ids_truncated_mid_line(tmp_path):
    path = tmp_path / "out.jsonl"
    good = jl(id="a", answer="é") + jl(id="b")
    path.write_bytes(good + jl(id="c", answer="красный")[:25])
    assert read_done_ids(path) == {"a", "b"}
    assert path.read_bytes() == good


def test_read_done_ids_cut_inside_utf8_sequence(tmp_path):
    path = tmp_path / "out.jsonl"
    good = jl(id="a")
    partial = jl(id="c", answer="🔴🔴")
    cut = partial.index("🔴".encode()) + 2
    path.write_bytes(good + partial[:cut])
    assert read_done_ids(path) == {"a"}
    assert path.read_bytes() == good


def test_read_done_ids_valid_json_without_newline_is_removed(tmp_path):
    # A killed writer may have stopped right before the newline: the line counts as incomplete.
    path = tmp_path / "out.jsonl"
    good = jl(id="a")
    path.write_bytes(good + jl(id="b").rstrip(b"\n"))
    assert read_done_ids(path) == {"a"}
    assert path.read_bytes() == good


def test_read_done_ids_garbage_last_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    good = jl(id="a") + b"not json\n" + jl(id="b")
    path.write_bytes(good + b'{"id": "c", "ans\n' + b"\n" + b"[1,2]\n")
    assert read_done_ids(path) == {"a", "b"}  # mid-file garbage skipped but kept
    assert path.read_bytes() == good


def test_read_done_ids_only_partial_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":"a","sou')
    assert read_done_ids(path) == set()
    assert path.read_bytes() == b""


def test_read_done_ids_empty_and_missing(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert read_done_ids(missing) == set()
    assert not missing.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert read_done_ids(empty) == set()
    assert empty.read_bytes() == b""


def test_read_done_ids_retry_errors(tmp_path):
    path = tmp_path / "out.jsonl"
    data = jl(id="a") + jl(id="b", error="oom") + jl(id="c", error="oom") + jl(id="c", answer="ok")
    path.write_bytes(data)
    assert read_done_ids(path) == {"a", "b", "c"}
    assert read_done_ids(path, retry_errors=True) == {"a", "c"}  # last row per id decides
    assert path.read_bytes() == data  # error lines stay


def test_resume_append_after_kill(tmp_path):
    path = tmp_path / "out.jsonl"
    good = jl(id="a")
    path.write_bytes(good + b'{"id":"b"')
    sink = open_sink("jsonl", str(path), append=True)  # repairs before appending
    sink.write(make_row(id="b"))
    sink.close()
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == ["a", "b"]
    assert repair_jsonl(path) == 0


# ------------------------------------------------------------------------------------------- summary


def test_summary_line():
    s = Summary()
    for i in range(195):
        s.add(make_row(id=str(i), tokens=9))
    for i in range(3):
        s.add(make_row(id=f"e{i}", tokens=576, error="oom"))  # failed rows don't count towards tokens
    s.skip(2)
    s.elapsed_s = 198 / 41.3
    assert s.line() == "done 195, failed 3, skipped 2 · mean tokens 9.0 · 41.3 items/s"
    assert str(s) == s.line()


def test_summary_empty():
    s = Summary()
    s.stop()
    assert s.line().startswith("done 0, failed 0, skipped 0 · mean tokens n/a · ")
