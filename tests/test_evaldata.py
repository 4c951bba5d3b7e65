"""Eval data sources: JSONL, CSV, folders and stdin; bad rows reported by line; ids unique; grouping."""

from __future__ import annotations

import io
import json
import os

import pytest

from m3cli.errors import UsageError
from m3cli.eval.data import BadRow, EvalRow, group_by_image, image_key, read_eval_data, split_rows
from m3cli.eval.scoring import metric_for, score


def _image(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not decoded here")
    return str(path)


def _jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    """data/set.jsonl next to data/img/{a,b}.png."""
    _image(tmp_path / "data" / "img" / "a.png")
    _image(tmp_path / "data" / "img" / "b.png")
    return tmp_path / "data"


def test_jsonl_every_gold_form(data_dir):
    src = _jsonl(
        data_dir / "set.jsonl",
        [
            {"id": "q1", "image": "img/a.png", "question": "What colour?", "answer": "red", "family": "colour"},
            {"image": "img/b.png", "question": "How many?", "answers": ["2", "two", "3"], "category": "count"},
            {"image": "img/a.png", "question": "Which?", "choices": ["red", "blue"], "answer": "b"},
            {"image": "img/a.png", "question": "Which?", "choices": ["red", "blue"], "answer": "Red"},
            {"image": "img/b.png", "question": "VQAv2 style?", "answers": [{"answer": "yes", "answer_id": 1}]},
            {"image": "img/b.png", "question": "Number gold?", "answer": 3},
        ],
    )
    rows = list(read_eval_data(src))
    assert all(isinstance(r, EvalRow) for r in rows), rows
    a, b, c, d, e, f = rows
    assert (a.id, a.gold_kind, a.gold, a.family, a.line) == ("q1", "answer", ("red",), "colour", 1)
    assert a.image == str(data_dir / "img" / "a.png") and os.path.isabs(a.image)
    assert (b.id, b.gold_kind, b.gold, b.family) == ("set:2", "answers", ("2", "two", "3"), "count")
    assert (c.gold_kind, c.gold, c.choices) == ("choice", ("B",), ("red", "blue"))
    assert d.gold == ("A",) and d.reference == "A. red"
    assert (e.gold_kind, e.gold) == ("answers", ("yes",))
    assert f.gold == ("3",)
    assert [metric_for(r) for r in rows] == ["exact", "vqa", "choice", "choice", "vqa", "exact"]
    # 2 of 3 humans match: leaving out a match leaves 1 (1/3), leaving out the other leaves 2 (2/3).
    assert score("vqa", "Two", b) == pytest.approx((2 * (1 / 3) + 2 / 3) / 3)
    assert score("choice", "The answer is B", c) == 1.0
    assert all(r.source == src for r in rows)


def test_csv_every_gold_form_and_list_cells(data_dir):
    (data_dir / "set.csv").write_text(
        "ID,Image,Question,Answer,Answers,Choices,Family\n"
        "c1,img/a.png,What colour?,red,,,colour\n"
        ",img/b.png,How many?,,\"[\"\"2\"\", \"\"two\"\"]\",,count\n"
        ",img/b.png,How many again?,,2|two| 3 ,,count\n"
        ",img/a.png,\"Which one,\nreally?\",B,,\"[\"\"red\"\", \"\"blue\"\"]\",\n"
        ",img/a.png,Which pipe?,blue,,red|blue,\n",
        encoding="utf-8",
    )
    rows = list(read_eval_data(data_dir / "set.csv"))
    assert all(isinstance(r, EvalRow) for r in rows), rows
    a, b, c, d, e = rows
    assert (a.id, a.gold_kind, a.gold, a.family, a.line) == ("c1", "answer", ("red",), "colour", 2)
    assert (b.id, b.gold_kind, b.gold) == ("set:3", "answers", ("2", "two"))
    assert c.gold == ("2", "two", "3")
    assert (d.gold_kind, d.gold, d.choices, d.question, d.line) == ("choice", ("B",), ("red", "blue"),
                                                                     "Which one,\nreally?", 5)
    assert (e.line, e.gold, e.choices) == (7, ("B",), ("red", "blue"))  # the quoted record spans lines 5-6
    assert d.family is None


def test_tsv_and_bom(data_dir):
    (data_dir / "t.tsv").write_bytes("\ufeffimage\tquestion\tanswer\nimg/a.png\tWhat?\tyes\n".encode())
    (row,) = read_eval_data(data_dir / "t.tsv")
    assert (row.id, row.gold, row.question) == ("t:2", ("yes",), "What?")


def test_absolute_image_path(tmp_path, data_dir):
    img = _image(tmp_path / "elsewhere" / "c.png")
    (row,) = read_eval_data(_jsonl(data_dir / "abs.jsonl", [{"image": img, "question": "q", "answer": "a"}]))
    assert row.image == img


def test_folder_recursive_sorted_with_relative_ids(tmp_path):
    root = tmp_path / "suite"
    _image(root / "img" / "a.png")
    _jsonl(root / "b.jsonl", [{"image": "img/a.png", "question": "q", "answer": "x"}])
    _jsonl(root / "a" / "one.jsonl", [{"image": "../img/a.png", "question": "q", "answer": "y"}])
    (root / "c.csv").write_text("image,question,answer\nimg/a.png,q,z\n", encoding="utf-8")
    _jsonl(root / ".hidden.jsonl", [{"image": "img/a.png", "question": "q", "answer": "hidden"}])
    _jsonl(root / ".cache" / "x.jsonl", [{"image": "img/a.png", "question": "q", "answer": "hidden"}])
    (root / "notes.txt").write_text("not data", encoding="utf-8")
    rows = list(read_eval_data(root))
    assert [(r.id, r.gold) for r in rows] == [("a/one:1", ("y",)), ("b:1", ("x",)), ("c:2", ("z",))]
    assert {r.image for r in rows} == {str(root / "img" / "a.png")}


def test_stdin_jsonl_relative_to_cwd(tmp_path, monkeypatch):
    _image(tmp_path / "img" / "a.png")
    monkeypatch.chdir(tmp_path)
    stdin = io.StringIO('\n{"image": "img/a.png", "question": "q", "answer": "x"}\nnot json\n')
    rows = list(read_eval_data("-", stdin=stdin))
    assert isinstance(rows[0], EvalRow)
    first, second = rows
    assert (first.id, first.line, first.image, first.source) == ("stdin:2", 2, str(tmp_path / "img" / "a.png"), "-")
    assert isinstance(second, BadRow) and second.line == 3
    assert second.message.startswith("stdin line 3: not valid JSON")


def test_stdin_csv_and_empty(tmp_path, monkeypatch):
    _image(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    (row,) = read_eval_data("-", stdin=io.StringIO("image,question,answers\na.png,q,yes|no\n"))
    assert (row.id, row.gold_kind, row.gold) == ("stdin:2", "answers", ("yes", "no"))
    assert list(read_eval_data("-", stdin=io.StringIO(""))) == []
    binary = io.BytesIO(b'{"image": "a.png", "question": "q", "answer": "x"}\n')
    assert [r.gold for r in read_eval_data("-", stdin=binary)] == [("x",)]


def test_bad_rows_are_reported_with_line_numbers(data_dir):
    lines = [
        {"image": "img/a.png", "question": "fine", "answer": "x"},  # 1
        "{not json",  # 2
        "[1, 2]",  # 3
        {"image": "img/a.png", "answer": "x"},  # 4
        {"question": "q", "answer": "x"},  # 5
        {"image": "img/missing.png", "question": "q", "answer": "x"},  # 6
        {"image": "img/a.png", "question": "q", "answer": {"text": "x"}},  # 7
        {"image": "img/a.png", "question": "q"},  # 8
        {"image": "img/a.png", "question": "q", "choices": ["x", "y"]},  # 9
        {"image": "img/a.png", "question": "q", "choices": ["x", "y"], "answer": "z"},  # 10
        {"image": "img/a.png", "question": "q", "choices": ["x"], "answer": "A"},  # 11
        {"image": "img", "question": "q", "answer": "x"},  # 12: a folder
        "",  # 13: blank lines are skipped
        {"id": {"x": 1}, "image": "img/a.png", "question": "q", "answer": "x"},  # 14
        {"image": "img/a.png", "question": "still read", "answer": "x"},  # 15
    ]
    rows = list(read_eval_data(_jsonl(data_dir / "bad.jsonl", lines)))
    good, bad = split_rows(rows)
    assert [r.line for r in good] == [1, 15]
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14]
    assert "not valid JSON" in reasons[2]
    assert "JSON object" in reasons[3]
    assert reasons[4] == "missing field 'question'"
    assert reasons[5] == "missing field 'image'"
    assert reasons[6].startswith("image not found: ") and reasons[6].endswith("missing.png")
    assert "'answer' must be a string" in reasons[7]
    assert reasons[8].startswith("no gold answer")
    assert "without the gold 'answer'" in reasons[9]
    assert "neither a letter A-B nor one of the choices" in reasons[10]
    assert "2 to 26 options" in reasons[11]
    assert "folder" in reasons[12]
    assert "'id' must be a string" in reasons[14]
    assert all("\n" not in b.reason and b.id == f"bad:{b.line}" for b in bad)


def test_bad_csv_rows(data_dir):
    (data_dir / "bad.csv").write_text(
        "image,question,answers,choices,answer\n"
        "img/a.png,q,\"[\"\"a\"\",\",,\n"  # 2: broken JSON list
        "img/a.png,q,,\"{\"\"a\"\": 1}\",A\n"  # 3: JSON but not a list... starts with "{": |-split as one item
        "img/a.png,,x,,\n"  # 4: no question
        "img/a.png,q,,,\n",  # 5: no gold
        encoding="utf-8",
    )
    rows = list(read_eval_data(data_dir / "bad.csv"))
    by_line = {r.line: r for r in rows}
    assert isinstance(by_line[2], BadRow) and "not valid JSON" in by_line[2].reason
    assert isinstance(by_line[3], BadRow) and "2 to 26 options" in by_line[3].reason
    assert isinstance(by_line[4], BadRow) and by_line[4].reason == "missing field 'question'"
    assert isinstance(by_line[5], BadRow) and by_line[5].reason.startswith("no gold answer")


def test_duplicate_ids_made_unique(data_dir):
    src = _jsonl(
        data_dir / "dup.jsonl",
        [
            {"id": "q", "image": "img/a.png", "question": "1", "answer": "x"},
            {"id": "q", "image": "img/a.png", "question": "2", "answer": "x"},
            {"id": "q~2", "image": "img/a.png", "question": "3", "answer": "x"},
            {"id": "dup:5", "image": "img/a.png", "question": "4", "answer": "x"},
            {"image": "img/a.png", "question": "5", "answer": "x"},  # default id dup:5 is taken
            {"id": 7, "image": "img/a.png", "question": "6", "answer": "x"},
        ],
    )
    ids = [r.id for r in read_eval_data(src)]
    assert ids == ["q", "q~2", "q~2~2", "dup:5", "dup:5~2", "7"]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "nope.jsonl", "no such file"),
        (lambda d: _image(d / "x.txt"), "not a JSONL or CSV file"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no .jsonl"),
        (lambda d: (d / "h.csv").write_text("img,q,answer\na,b,c\n") and d / "h.csv", "no 'image' or 'question'"),
    ],
)
def test_unreadable_sources_raise_one_line_usage_errors(data_dir, make, match):
    with pytest.raises(UsageError, match=match) as info:
        read_eval_data(make(data_dir))  # raised at once, before any row is read
    assert "\n" not in str(info.value)


def test_stdin_csv_without_header_columns_raises(data_dir):
    with pytest.raises(UsageError, match="stdin: the CSV header has no 'image'"):
        list(read_eval_data("-", stdin=io.StringIO("path,question\nx,y\n")))


def test_group_by_image_uses_file_identity_in_first_seen_order(tmp_path, data_dir):
    os.symlink(data_dir / "img" / "a.png", data_dir / "img" / "link.png")
    src = _jsonl(
        data_dir / "g.jsonl",
        [
            {"image": "img/b.png", "question": "1", "answer": "x"},
            {"image": "img/a.png", "question": "2", "answer": "x"},
            {"image": "./img/../img/b.png", "question": "3", "answer": "x"},
            {"image": "img/missing.png", "question": "bad", "answer": "x"},
            {"image": "img/link.png", "question": "4", "answer": "x"},
            {"image": str(data_dir / "img" / "a.png"), "question": "5", "answer": "x"},
        ],
    )
    groups = group_by_image(read_eval_data(src))
    assert [key for key, _ in groups] == [image_key(data_dir / "img" / "b.png"), image_key(data_dir / "img" / "a.png")]
    assert [[r.question for r in rows] for _, rows in groups] == [["1", "3"], ["2", "4", "5"]]
