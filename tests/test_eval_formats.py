"""m3 eval on the files researchers already have: MMBench TSV (LLaVA's prompt, VLMEvalKit's letter matching,
CircularEval), LLaVA question and answer files, lmms-eval's samples layout; resume after a kill."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re

import pytest
from click.testing import CliRunner

from m3cli.backends.base import Encoded, Generation
from m3cli.cli import cli
from m3cli.eval.benchmark import BenchOptions, evaluate_benchmark
from m3cli.eval.data import read_eval_data
from m3cli.eval.datarun import DataOptions, prompt_for
from m3cli.eval.scoring import infer_option, score

INSTRUCTION = "Answer with the option's letter from the given choices directly."
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category", "split",
           "image"]


def _png_b64(colour) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


# index, question, hint cell, option cells A..E, answer, category, l2-category, image cell (a row's index: shared)
TSV_ROWS = [
    (1, "What colour is it?", "Look closely.", ["red", "green", "blue", "yellow", ""], "A", "colour", "perception",
     _png_b64((200, 0, 0))),
    (2, "How many?", "", ["one", "two", "", "", ""], "B", "count", "reasoning", _png_b64((0, 200, 0))),
    (3, "Which shape?", "nan", ["circle", "square", "star", "moon", "cross"], "E", "shape", "perception",
     _png_b64((0, 0, 200))),
    (4, "Is it bright?", "None", ["yes", "no", "NA", "maybe", ""], "A", "colour", "perception", "1"),
    (5, "  Spaces kept? ", "Two lines\nof hint", ["a", "b", "c", "", ""], "C", "count", "reasoning",
     _png_b64((90, 90, 90))),
]
# the options LLaVA's script keeps: A, B, ... cut at the first missing one (row 4: "NA" is pandas' NaN)
KEPT = {1: ["red", "green", "blue", "yellow"], 2: ["one", "two"], 3: ["circle", "square", "star", "moon", "cross"],
        4: ["yes", "no"], 5: ["a", "b", "c"]}
HINTS = {1: "Look closely.", 2: None, 3: None, 4: None, 5: "Two lines\nof hint"}


def _write_tsv(path, rows=TSV_ROWS, extra=()):
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(COLUMNS)
    for index, question, hint, options, answer, category, l2, image in [*rows, *extra]:
        writer.writerow([index, question, hint, *options, answer, category, l2, "dev", image])
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


@pytest.fixture
def tsv(tmp_path):
    return _write_tsv(tmp_path / "mmbench_dev.tsv")


def llava_text(question: str, hint: str | None, options: list[str]) -> str:
    """LLaVA's model_vqa_mmbench.py text, restated here: hint + newline + question, then a line per option."""
    text = question if hint is None else hint + "\n" + question
    for letter, option in zip("ABCDE", options, strict=False):
        text = text + "\n" + letter + ". " + option
    return text


# --- a scripted backend: the code under test is real, only the answers are fixed ------------------------


CORRECT = {"What colour is it?": "red", "How many?": "two", "Which shape?": "cross", "Is it bright?": "yes",
           "Spaces kept?": "c"}
# question -> scale -> how it answers: the right letter, always "A", or the right option's text
MODES = {
    "What colour is it?": {1: "A", 9: "letter", 576: "letter"},
    "How many?": {1: "A", 9: "text", 576: "letter"},
    "Which shape?": {1: "letter", 9: "A", 576: "text"},
    "Is it bright?": {1: "A", 9: "A", 576: "letter"},
    "Spaces kept?": {1: "letter", 9: "letter", 576: "letter"},
}


class Scripted:
    name = "scripted"
    model_id = "/ckpt/llava-v1.5-7b-m3"
    grid_side = 24
    scales = [576, 144, 36, 9, 1]

    def __init__(self, stop_after_calls=None):
        self.images = 0
        self.prompts = []
        self.calls = 0
        self.stop_after_calls = stop_after_calls

    def encode(self, images):
        self.images += len(images)
        return [Encoded(grid=None, side=24, encode_ms=2.0) for _ in images]

    def answer(self, requests):
        self.calls += 1
        if self.stop_after_calls is not None and self.calls > self.stop_after_calls:
            raise KeyboardInterrupt
        out = []
        for r in requests:
            self.prompts.append((r.question, r.scale))
            question = next(q for q in CORRECT if q in r.question)
            options = dict(re.findall(r"^([A-E])\. (.*)$", r.question, re.M))
            if not options:  # an open question
                out.append(Generation(CORRECT[question], [0], [math.log(0.9)], 1.0, 1.0))
                continue
            mode = MODES[question][r.scale]
            right = next(k for k, v in options.items() if v == CORRECT[question])
            text = {"A": "A", "letter": right, "text": f"It is {CORRECT[question]}"}[mode]
            out.append(Generation(text, [0], [math.log(0.6 if mode == "A" else 0.9)], 1.0, 1.0))
        return out

    def close(self):
        pass


def _bench(rows, circular=True, **kw):
    return evaluate_benchmark(Scripted(), rows, DataOptions([1, 9, 576], batch_size=4, **kw),
                              BenchOptions(circular=circular), "mmbench_dev.tsv")


# --- reading and prompting ------------------------------------------------------------------------------


def test_prompt_is_llavas_mmbench_prompt(tsv):
    rows = list(read_eval_data(tsv))
    assert [r.id for r in rows] == ["1", "2", "3", "4", "5"]
    for row, (index, question, *_rest) in zip(rows, TSV_ROWS, strict=True):
        assert list(row.choices) == KEPT[index]
        expected = llava_text(question, HINTS[index], KEPT[index]) + "\n" + INSTRUCTION
        assert prompt_for(row, DataOptions([1])) == expected
        assert row.meta["category"] == row.family and row.meta["l2-category"] in ("perception", "reasoning")
    # inside the model's conversation (vicuna_v1, what the LLaVA-1.5 / M3 evaluation scripts use)
    from m3cli.families.prompts import vicuna_v1

    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    text = llava_text("What colour is it?", "Look closely.", KEPT[1])
    assert vicuna_v1().text(prompt_for(rows[0], DataOptions([1]))) == (
        f"{system} USER: <image>\n{text}\n{INSTRUCTION} ASSISTANT:")
    # the image cell "1" of row 4 is row 1's picture: one encode-cache key, one decode
    assert rows[3].image_source.key == rows[0].image_source.key != rows[1].image_source.key
    assert rows[3].image_source.load().getpixel((0, 0)) == (200, 0, 0)
    assert not list(tsv.parent.glob("*.png"))  # decoded in memory, nothing written next to the data


def test_prompt_matches_llava_reading_the_file_with_pandas(tsv):
    pd = pytest.importorskip("pandas")

    def is_none(value):  # LLaVA's own test of a missing cell
        return value is None or (type(value) is float and math.isnan(value)) or (
            type(value) is str and value.lower() in ("nan", "none"))

    expected = {}
    for _, row in pd.read_table(tsv).iterrows():
        options = []
        for letter in "ABCDE":
            if is_none(row[letter]):
                break
            options.append(row[letter])
        question = row["question"]
        if not is_none(row["hint"]):
            question = row["hint"] + "\n" + question
        for letter, option in zip("ABCDE", options, strict=False):
            question = question + "\n" + letter + ". " + option
        expected[str(row["index"])] = question + "\n" + INSTRUCTION
    assert {r.id: prompt_for(r, DataOptions([1])) for r in read_eval_data(tsv)} == expected


def test_bad_mmbench_rows_are_rows_not_crashes(tmp_path):
    bad = [(8, "No picture?", "", ["x", "y", "", "", ""], "A", "c", "l", ""),
           (9, "Gold out of range?", "", ["x", "y", "", "", ""], "D", "c", "l", "1"),
           (10, "One option?", "", ["x", "", "z", "", ""], "A", "c", "l", "1"),
           (11, "Names a missing row?", "", ["x", "y", "", "", ""], "A", "c", "l", "77"),
           (12, "Not base64?", "", ["x", "y", "", "", ""], "A", "c", "l", "%%%% not an image, long enough " * 3)]
    path = _write_tsv(tmp_path / "bad.tsv", TSV_ROWS[:1], bad)
    res = evaluate_benchmark(Scripted(), list(read_eval_data(path)), DataOptions([1, 9]),
                             BenchOptions(answers_out=str(tmp_path / "a.jsonl")), "bad.tsv")
    reasons = {e["id"]: e["error"] for e in res.data.errors}
    assert set(reasons) == {"8", "9", "10", "11", "12"} and len(res.report.records) == 1
    assert "empty" in reasons["8"] and "not one of the option letters" in reasons["9"]
    assert "at least options A and B" in reasons["10"] and "row 77" in reasons["11"]
    assert "index 12" in reasons["12"]
    # every row keeps its line in the answer files (POPE's scorer pairs by position); not evaluated: empty text
    lines = [json.loads(x) for x in (tmp_path / "a-9.jsonl").read_text().splitlines()]
    assert [(str(x["question_id"]), x["text"]) for x in lines] == [
        ("1", "A"), ("8", ""), ("9", ""), ("10", ""), ("11", ""), ("12", "")]


def test_mmbench_letter_matching():
    opts = ["cat", "dog", "bird"]
    assert infer_option("B", opts) == "B" and infer_option("(C)", opts) == "C"
    assert infer_option("The answer is B.", opts) == "B"
    assert infer_option("A", opts) == "A" and infer_option("dog", opts) == "B"
    assert infer_option("A and B", opts) is None  # two letters, no single option text either
    assert infer_option("B is right, but the long explanation goes on and on", opts) is None  # not near the end
    assert infer_option("a dog", opts) == "B"  # option text, short answer
    assert infer_option("Cannot determine the answer", opts) is None and infer_option("Z", opts) is None
    assert score("mmbench", "It is dog", {"choices": opts, "answer": "B"}) == 1.0


# --- CircularEval ---------------------------------------------------------------------------------------


def test_circular_accuracy_and_categories(tsv):
    res = _bench(list(read_eval_data(tsv)))
    circular, single = res.report, res.single
    assert res.grouped.asked == 16 == len(res.data.samples)  # 4 + 2 + 5 + 2 + 3 rotations
    # by hand: single pass right at 1 token: rows 1 (A), 3, 4 (A), 5; circular: 3, 5 ("A" fails a rotation)
    assert [single.accuracy(s) for s in (1, 9, 576)] == pytest.approx([4 / 5, 4 / 5, 1.0])
    assert [circular.accuracy(s) for s in (1, 9, 576)] == pytest.approx([2 / 5, 3 / 5, 1.0])
    assert all(circular.accuracy(s) <= single.accuracy(s) for s in (1, 9, 576))
    assert circular.families == ["colour", "count", "shape"]
    assert {f: sum(r.family == f for r in circular.records) for f in circular.families} == {
        "colour": 2, "count": 2, "shape": 1}
    assert [circular.accuracy(1, f) for f in circular.families] == [0.0, 0.5, 1.0]
    assert res.by_l2.families == ["perception", "reasoning"]
    assert res.by_l2.accuracy(1, "perception") == pytest.approx(1 / 3)
    # the oracle: the fewest tokens at which every rotation is right (rows 1, 2: 9; 3: 1; 4: 576; 5: 1)
    assert circular.oracle()["accuracy"] == 1.0
    assert circular.oracle()["mean_tokens"] == pytest.approx((9 + 9 + 1 + 576 + 1) / 5)
    # the gold letter moves with its option: row 2 (gold "two" at B) is gold A in its second round
    rounds = [s for s in res.data.samples if s["meta"]["group"] == "2"]
    assert [(s["id"], s["gold"], s["choices"]) for s in rounds] == [
        ("2", ["B"], ["one", "two"]), ("2@1", ["A"], ["two", "one"])]
    assert rounds[1]["prompt"] == llava_text("How many?", None, ["two", "one"]) + "\n" + INSTRUCTION


def test_file_copies_are_the_rounds(tmp_path):
    """VLMEvalKit MMBench files hold the rotations as rows index + k * 1e6 (picture: the main row's index)."""
    copies = [(1000001, "What colour is it?", "Look closely.", ["green", "blue", "yellow", "red", ""], "D",
               "colour", "perception", "1"),
              (2000001, "What colour is it?", "Look closely.", ["blue", "yellow", "red", "green", ""], "C",
               "colour", "perception", "1")]
    path = _write_tsv(tmp_path / "copies.tsv", TSV_ROWS[:2], copies)
    res = evaluate_benchmark(Scripted(), list(read_eval_data(path)), DataOptions([1, 9, 576]),
                             BenchOptions(circular=True, answers_out=str(tmp_path / "a.jsonl")), "copies.tsv")
    assert [s["id"] for s in res.data.samples] == ["1", "1000001", "2000001", "2", "2@1"]
    assert res.grouped.asked == 5 and len(res.report.records) == 2
    assert res.report.accuracy(9) == 1.0 and res.report.accuracy(1) == 0.0 and res.single.accuracy(1) == 0.5
    lines = [json.loads(x) for x in (tmp_path / "a-9.jsonl").read_text().splitlines()]
    assert [(x["question_id"], x["round_id"]) for x in lines] == [(1, 0), (1000001, 0), (2000001, 0), (2, 0), (2, 1)]


def test_one_encode_per_image_across_rotations_and_scales(tsv):
    from m3cli.backends.torch import TorchBackend
    from m3cli.models.registry import resolve_model

    backend = TorchBackend(resolve_model(None), device="cpu")
    seen = []
    hook = backend.model.model.vision_tower.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    try:
        res = evaluate_benchmark(backend, list(read_eval_data(tsv)), DataOptions([1, 9, 576], batch_size=5),
                                 BenchOptions(circular=True), "mmbench_dev.tsv")
    finally:
        hook.remove()
    # 16 questions asked (every rotation) at 3 scales over 4 pictures (row 4 shows row 1's): 4 tower passes
    assert res.grouped.asked == 16 and res.data.images == 4
    assert sum(seen) == 4 and res.data.encodes == 4


# --- LLaVA files ----------------------------------------------------------------------------------------


MMBENCH_FIELDS = ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id",
                  "metadata"]
LLAVA_FIELDS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


def test_llava_answer_files(tsv, tmp_path):
    res = evaluate_benchmark(Scripted(), list(read_eval_data(tsv)), DataOptions([1, 9, 576]),
                             BenchOptions(circular=True, answers_out=str(tmp_path / "ans" / "{tokens}" / "m3.jsonl")),
                             "mmbench_dev.tsv")
    assert res.answers == [str(tmp_path / "ans" / str(t) / "m3.jsonl") for t in (1, 9, 576)]
    lines = [json.loads(x) for x in (tmp_path / "ans" / "9" / "m3.jsonl").read_text().splitlines()]
    assert all(list(x) == MMBENCH_FIELDS for x in lines) and len(lines) == 16
    first, rotated = lines[0], lines[1]
    assert first == {**first, "question_id": 1, "round_id": 0, "prompt": llava_text(
        "What colour is it?", "Look closely.", KEPT[1]), "text": "A", "options": KEPT[1],
        "option_char": ["A", "B", "C", "D"], "model_id": "llava-v1.5-7b-m3", "metadata": {}}
    assert rotated["round_id"] == 1 and rotated["options"] == ["green", "blue", "yellow", "red"]
    assert rotated["option_char"] == ["B", "C", "D", "A"] and rotated["text"] == "D"

    # a LLaVA question file: question_id kept as written, text asked as is, no gold needed
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "img" / "x.png")
    questions = [{"question_id": "q7", "image": "x.png", "text": "How many?\nAnswer the question using a single "
                  "word or phrase.", "category": "count"},
                 {"question_id": 8, "image": "x.png", "text": "What colour is it?", "category": "colour",
                  "label": "red"}]
    qfile = tmp_path / "llava_q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    rows = list(read_eval_data(qfile, image_folder=tmp_path / "img"))
    assert [r.gold_kind for r in rows] == ["none", "answer"] and rows[0].question == questions[0]["text"]
    res = evaluate_benchmark(Scripted(), rows, DataOptions([9]), BenchOptions(answers_out=str(tmp_path / "l.jsonl")),
                             "llava_q.jsonl")
    assert res.data.unscored == 1 and len(res.report.records) == 1 and res.data.images == 1
    lines = [json.loads(x) for x in (tmp_path / "l-9.jsonl").read_text().splitlines()]
    assert all(list(x) == LLAVA_FIELDS for x in lines)
    assert [(x["question_id"], x["prompt"]) for x in lines] == [("q7", questions[0]["text"]),
                                                               (8, "What colour is it?")]


def test_only_unscored_rows_still_answer(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "x.png")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "How many?", "category": "c"}) + "\n")
    import m3cli.backends

    original = m3cli.backends.open_backend
    m3cli.backends.open_backend = lambda **kw: Scripted()
    try:
        res = CliRunner().invoke(cli, ["eval", "--data", str(q), "--tokens", "1,9", "--answers-out",
                                       str(tmp_path / "a.jsonl"), "--json", str(tmp_path / "r.json")])
    finally:
        m3cli.backends.open_backend = original
    assert res.exit_code == 0, res.output
    assert "nothing to score" in res.stdout and (tmp_path / "a-9.jsonl").exists()
    assert json.loads((tmp_path / "r.json").read_text())["unscored"] == 1


# --- lmms-eval layout and resume --------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


@pytest.mark.parametrize("layout", ["m3", "lmms-eval"])
def test_killed_circular_run_resumes_to_the_same_report(tsv, tmp_path, monkeypatch, layout):
    import m3cli.backends

    samples = tmp_path / "s.jsonl"
    base = ["--data", tsv, "--circular", "--tokens", "1,9,576", "--batch-size", "5"]
    whole = [*base, "--json", tmp_path / "whole.json", "--answers-out", tmp_path / "whole.jsonl"]
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: Scripted())
    assert _run(*whole).exit_code == 0

    run = [*base, "--samples", samples, "--samples-format", layout]
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: Scripted(stop_after_calls=4))
    res = _run(*run)  # killed during the second batch (of four)
    assert res.exit_code == 130 and "interrupted" in res.stderr
    with samples.open("a") as f:  # and a half-written line, as this layout's writer leaves one
        f.write('{"doc_id": 5, "doc": {"id"' if layout == "lmms-eval" else '{"id": "5", "image"')
    again = Scripted()
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: again)
    res = _run(*run, "--resume", "--json", tmp_path / "resumed.json", "--answers-out", tmp_path / "resumed.jsonl")
    assert res.exit_code == 0, res.output
    assert len(again.prompts) == 3 * 11  # the 11 queries not done, at 3 scales
    a, b = json.loads((tmp_path / "whole.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    for key in ("accuracy", "by_family", "oracle", "calibration", "n", "single_pass", "by_l2_category", "circular"):
        assert a[key] == b[key], key
    assert b["circular"] == {"questions": 5, "asked": 16, "incomplete": []} and b["resumed"] == 5
    drop = [{k: v for k, v in e.items() if k != "ms_per_item"} for e in a["escalation"]]
    assert drop == [{k: v for k, v in e.items() if k != "ms_per_item"} for e in b["escalation"]]
    for t in (1, 9, 576):
        assert (tmp_path / f"whole-{t}.jsonl").read_text() == (tmp_path / f"resumed-{t}.jsonl").read_text()
    if layout == "lmms-eval":
        lines = [json.loads(x) for x in samples.read_text().splitlines()]
        assert len(lines) == 16 * 3 and {x["tokens"] for x in lines} == {1, 9, 576}
        keys = ["doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "doc_hash",
                "prompt_hash", "target_hash", "mmbench", "tokens", "m3"]
        assert all(list(x) == keys for x in lines)
        nine = [x for x in lines if x["tokens"] == 9]
        assert [x["doc_id"] for x in nine] == list(range(16))  # one run's log: one line per document
        assert nine[1]["target"] == "D" and nine[1]["filtered_resps"] == ["D"] and nine[1]["mmbench"] == 1.0
        assert nine[1]["resps"] == [["D"]] and nine[1]["arguments"][1]["visual_tokens"] == 9


def test_cli_flags_and_export(tmp_path):
    for args, message in [(["--circular"], "--circular need(s) --data"),
                          (["--answers-out", "a.jsonl"], "--answers-out need(s) --data"),
                          (["--data", tmp_path, "--samples-format", "lmms-eval"], "--samples-format needs --samples"),
                          (["--export-format", "mmbench"], "goes with --export-data")]:
        res = _run(*args)
        assert res.exit_code == 2 and message in res.stderr, (args, res.output)
    res = _run("--export-data", tmp_path / "mm", "-n", "14", "--export-format", "mmbench")
    assert res.exit_code == 0 and "wrote 14 questions" in res.stdout
    rows = list(read_eval_data(tmp_path / "mm" / "test.tsv"))
    assert len(rows) == 14 and {len(r.choices) for r in rows} >= {2, 3, 4}
    assert sum(r.meta["hint"] is not None for r in rows) == 4
    assert len({r.image_source.key for r in rows}) < 14  # later questions about a scene name its first row
    res = _run("--export-data", tmp_path / "ll", "-n", "6", "--export-format", "llava")
    rows = list(read_eval_data(tmp_path / "ll" / "llava_test.jsonl", image_folder=tmp_path / "ll" / "images"))
    assert res.exit_code == 0 and len(rows) == 6 and all(r.meta["format"] == "llava" for r in rows)
