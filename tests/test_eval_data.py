"""m3 eval --data: scoring by gold form, one encode per image, exactly-once resume, errors as rows, and the
same per-scale accuracy as the built-in synthetic eval on the same rows (shipped model, CPU)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from m3cli.backends.base import Encoded, Generation
from m3cli.cli import cli
from m3cli.data import scenes
from m3cli.eval.data import read_eval_data
from m3cli.eval.datarun import DataOptions, NothingEvaluated, evaluate_data
from m3cli.eval.engine import EncodeCache, EvalItem, answer_items
from m3cli.eval.report import soft_calibration_error
from m3cli.eval.scoring import CHOICE_SUFFIX, build_choice_prompt, score
from m3cli.matryoshka.confidence import expected_calibration_error

SHIPPED = ["--device", "cpu"]  # the default model is the shipped models/m3-shapes


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _run(*args, stdin=None):
    return CliRunner().invoke(cli, ["eval", *map(str, args)], input=stdin)


# --- a scripted backend: the evaluation code is real, only the model's answers are fixed --------------


class Scripted:
    """Answers looked up by (question = the prompt's first line, scale); counts encodes and answers."""

    name = "scripted"
    model_id = "scripted"
    grid_side = 24
    scales = [576, 144, 36, 9, 1]

    def __init__(self, table, stop_after_calls=None):
        self.table = table
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
            text, prob = self.table[r.question.split("\n")[0]][r.scale]
            out.append(Generation(text, [0], [math.log(prob)], 1.0, 1.0))
        return out

    def close(self):
        pass


# question -> scale -> (answer, confidence)
TABLE = {
    "q1": {1: ("Red.", 0.9), 9: ("red", 0.9), 576: ("red", 0.9)},
    "q2": {1: ("four", 0.5), 9: ("two", 0.85), 576: ("three", 0.9)},
    "q3": {1: ("A", 0.95), 9: ("The answer is B", 0.9), 576: ("dog", 0.9)},
    "q4": {1: ("three", 0.3), 9: ("3 shapes", 0.3), 576: ("the 3", 0.3)},
    "q5": {1: ("no", 0.99), 9: ("no", 0.99), 576: ("no", 0.99)},
}


@pytest.fixture
def hand_data(tmp_path):
    """Five rows in every gold form over two image files (one of them reached through two paths)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (48, 48), (200, 20, 20)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (48, 48), (20, 20, 200)).save(tmp_path / "img" / "b.png")
    rows = [
        {"id": "r1", "image": "img/a.png", "question": "q1", "answer": "red", "family": "fa"},
        {"id": "r2", "image": "img/a.png", "question": "q2", "answers": ["two"] * 2 + ["three"] * 8, "family": "fa"},
        {"id": "r3", "image": "img/b.png", "question": "q3", "choices": ["cat", "dog", "bird"], "answer": "B",
         "family": "fb"},
        {"id": "r4", "image": "img/../img/a.png", "question": "q4", "answer": "3"},
        {"id": "r5", "image": "img/b.png", "question": "q5", "answer": "yes"},
    ]
    return _write_jsonl(tmp_path / "hand.jsonl", rows)


def test_hand_computed_report(hand_data, tmp_path):
    backend = Scripted(TABLE)
    rows = list(read_eval_data(hand_data))
    res = evaluate_data(backend, rows, DataOptions([1, 9, 576], samples=str(tmp_path / "s.jsonl")), "hand")
    rep = res.report
    # r1 exact; r2 VQA: "two" matches 2 of 10 humans -> 0.6, "three" 8 -> 1; r3 choice B; r4 "three" -> "3"
    assert [rep.accuracy(s) for s in (1, 9, 576)] == pytest.approx([2 / 5, 2.6 / 5, 4 / 5])
    assert rep.families == ["fa", "fb", "(none)"]
    assert rep.accuracy(9, "fa") == pytest.approx(0.8) and rep.accuracy(1, "fb") == 0.0
    o = rep.oracle()  # picks 1, 576 (best score), 9, 1, none (counted at 576)
    assert o["accuracy"] == pytest.approx(0.8)
    assert o["mean_tokens"] == pytest.approx((1 + 576 + 9 + 1 + 576) / 5)
    assert o["mean_tokens_when_right"] == pytest.approx((1 + 576 + 9 + 1) / 4)
    esc = rep.escalation(0.8, "sequence")  # stops at 1, 9, 1, 576, 1
    assert esc["accuracy"] == pytest.approx((1 + 0.6 + 0 + 1 + 0) / 5)
    assert esc["mean_tokens"] == pytest.approx((1 + 9 + 1 + 576 + 1) / 5) and esc["mean_rungs"] == pytest.approx(1.6)
    assert res.metrics == {"exact": 3, "vqa": 1, "choice": 1}
    assert res.images == 2 and backend.images == 2  # a.png through two spellings is one image
    # the multiple-choice prompt is LLaVA's: options then the suffix
    assert (build_choice_prompt("q3", ["cat", "dog", "bird"]), 9) in backend.prompts
    assert "A. cat\nB. dog\nC. bird\n" + CHOICE_SUFFIX in build_choice_prompt("q3", ["cat", "dog", "bird"])
    samples = {s["id"]: s for s in _lines(tmp_path / "s.jsonl")}
    assert [x["score"] for x in samples["r2"]["scales"]] == pytest.approx([0.0, 0.6, 1.0])
    assert [x["correct"] for x in samples["r2"]["scales"]] == [False, False, True]
    assert samples["r3"]["oracle_tokens"] == 9 and samples["r5"]["oracle_tokens"] is None
    assert samples["r1"]["scales"][0]["confidence"] == pytest.approx(0.9)
    for s in samples.values():  # every stored score is the scoring rule applied to the stored answer
        row = next(r for r in rows if r.id == s["id"])
        assert all(x["score"] == score(s["metric"], x["answer"], row) for x in s["scales"])


def test_metric_override_and_suffixes(hand_data):
    backend = Scripted(TABLE)
    opts = DataOptions([1, 9, 576], metric="contains", question_suffix="Answer briefly.", prompt_suffix=None)
    rep = evaluate_data(backend, list(read_eval_data(hand_data)), opts, "hand").report
    assert rep.records[3].scores == {1: 1.0, 9: 1.0, 576: 1.0}  # "3 shapes" contains "3"
    assert ("q1\nAnswer briefly.", 1) in backend.prompts
    assert (build_choice_prompt("q3", ["cat", "dog", "bird"], None), 1) in backend.prompts


def test_soft_calibration_error():
    conf, ok = [0.95, 0.9, 0.15, 0.55], [True, False, False, True]
    assert soft_calibration_error(conf, [float(x) for x in ok]) == expected_calibration_error(conf, ok)
    # bins: [0.9, 1.0) holds 0.95 and 0.9 with scores 1 and 0.3 -> |0.925 - 0.65| * 2/4; 0.15 alone: |0.15 - 0| / 4
    assert soft_calibration_error([0.95, 0.9, 0.15], [1.0, 0.3, 0.0]) == pytest.approx((2 * 0.275 + 0.15) / 3)


def test_interrupted_run_resumes_exactly_once(hand_data, tmp_path, monkeypatch):
    import m3cli.backends

    samples, whole, resumed = tmp_path / "s.jsonl", tmp_path / "whole.json", tmp_path / "resumed.json"
    args = ["--data", hand_data, "--tokens", "1,9,576", "--batch-size", "2", "--samples", samples]
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: Scripted(TABLE))
    assert _run(*args[:-2], "--json", whole).exit_code == 0

    first = Scripted(TABLE, stop_after_calls=3)  # the second batch's first answer pass is interrupted
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: first)
    res = _run(*args)
    assert res.exit_code == 130 and "interrupted" in res.stderr
    assert [s["id"] for s in _lines(samples)] == ["r1", "r2"]
    with samples.open("a") as f:
        f.write('{"id": "r3", "scal')  # a half-written line from a killed writer

    again = Scripted(TABLE)
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: again)
    res = _run(*args, "--resume", "--json", resumed)
    assert res.exit_code == 0, res.output
    assert sorted({q.split("\n")[0] for q, _ in again.prompts}) == ["q3", "q4", "q5"]
    assert [s["id"] for s in _lines(samples)] == ["r1", "r2", "r3", "r4", "r5"]
    a, b = json.loads(whole.read_text()), json.loads(resumed.read_text())
    for key in ("accuracy", "by_family", "oracle", "calibration", "n"):
        assert a[key] == b[key]
    drop_time = [{k: v for k, v in e.items() if k != "ms_per_item"} for e in a["escalation"]]
    assert drop_time == [{k: v for k, v in e.items() if k != "ms_per_item"} for e in b["escalation"]]
    assert b["resumed"] == 2 and b["computed"] == 3

    nothing = Scripted(TABLE)
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: nothing)
    assert _run(*args, "--resume").exit_code == 0 and nothing.prompts == [] and len(_lines(samples)) == 5
    res = _run(*args[:-4], "--tokens", "1,144", "--batch-size", "2", "--samples", samples, "--resume")
    assert res.exit_code == 2 and "no answers at 144 tokens" in res.stderr and len(res.stderr.splitlines()) == 1


def test_bad_rows_are_counted_not_fatal(hand_data, tmp_path):
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    rows = hand_data.read_text().splitlines()[:2] + [
        "{not json",
        json.dumps({"id": "gone", "image": "img/missing.png", "question": "q1", "answer": "red"}),
        json.dumps({"id": "broken", "image": "img/broken.png", "question": "q1", "answer": "red"}),
        json.dumps({"id": "noq", "image": "img/a.png", "answer": "red"}),
    ]
    data = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    res = evaluate_data(Scripted(TABLE), list(read_eval_data(data)), DataOptions([1, 576]), "mixed")
    assert len(res.report.records) == 2
    reasons = {e["id"]: e["error"] for e in res.errors}
    assert set(reasons) == {"mixed:3", "gone", "broken", "noq"}
    assert "not valid JSON" in reasons["mixed:3"] and "image not found" in reasons["gone"]
    assert "broken.png" in reasons["broken"] and "question" in reasons["noq"]
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", rows[2:])
    with pytest.raises(NothingEvaluated, match="no row could be evaluated"):
        evaluate_data(Scripted(TABLE), list(read_eval_data(only_bad)), DataOptions([1]), "bad")
    forced = evaluate_data(Scripted(TABLE), list(read_eval_data(hand_data)), DataOptions([1], metric="choice"), "x")
    assert len(forced.report.records) == 1 and all("needs a row with 'choices'" in e["error"] for e in forced.errors)


def test_failing_backend_call_isolates_the_row(hand_data):
    class Picky(Scripted):
        def answer(self, requests):
            if any(r.question == "q4" for r in requests):
                if len(requests) == 1:
                    raise RuntimeError("CUDA out of memory\nsecond line")
                raise RuntimeError("batch failed")
            return super().answer(requests)

    res = evaluate_data(Picky(TABLE), list(read_eval_data(hand_data)), DataOptions([1, 9]), "hand")
    assert [e["id"] for e in res.errors] == ["r4"] and res.errors[0]["error"] == "RuntimeError: CUDA out of memory"
    assert len(res.report.records) == 4


def test_encode_cache_is_bounded_and_keyed():
    backend = Scripted({})
    items = [EvalItem(str(i), key, lambda: object(), "q") for i, key in enumerate("aabacbdda")]
    cache = EncodeCache(2)
    results = [r for batch in answer_items(backend, items, [], batch_size=2, cache=cache) for r in batch]
    # batches: [a a] [b a] [c b] [d d] [a]: a shared in batch 1, cached in 2; b cached in 3; a evicted by 5
    assert backend.images == 5 and cache.encodes == 5 and len(cache) == 2
    assert [r.reused for r in results] == [False, False, False, True, False, True, False, False, False]
    assert [r.encode_ms for r in results[:2]] == [1.0, 1.0]  # one 2 ms encode shared by two questions
    backend.images = 0
    list(answer_items(backend, items, [], batch_size=2, share=False))
    assert backend.images == len(items)


# --- the shipped model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from m3cli.backends.torch import TorchBackend
    from m3cli.models.registry import resolve_model

    return TorchBackend(resolve_model(None), device="cpu")


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    """A hand-made set over 8 synthetic scenes, up to 4 questions each in the three gold forms, rows shuffled
    so questions about one image are not adjacent."""
    root = tmp_path_factory.mktemp("scene-data")
    (root / "img").mkdir()
    rows = []
    for i in range(8):
        sample = scenes.sample("val", i)
        scenes.render(sample.scene).save(root / "img" / f"{i}.png")
        for qa in sample.qas[:4]:
            row = {"id": f"{i}-{qa.family}", "image": f"img/{i}.png", "question": qa.question, "family": qa.family}
            if qa.family in ("background", "colour_of"):  # choices from the family's words, gold by text
                row |= {"choices": scenes.answer_words(qa.family), "answer": qa.answer}
            elif qa.family == "count":  # VQAv2-style humans: 2 agree with the scene, 8 say "one"
                row |= {"answers": [qa.answer] * 2 + ["one"] * 8}
            else:
                row |= {"answer": qa.answer}
            rows.append(row)
    rows = rows[::2] + rows[1::2]
    return _write_jsonl(root / "scenes.jsonl", rows)


def test_shared_image_is_encoded_once(shipped, scene_data):
    images_seen = []
    tower = shipped.model.model.vision_tower
    hook = tower.register_forward_hook(
        lambda mod, args, kwargs, out: images_seen.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    try:
        rows = list(read_eval_data(scene_data))
        res = evaluate_data(shipped, rows, DataOptions([1, 9], batch_size=7), "scenes")
    finally:
        hook.remove()
    assert len(rows) > 24 and len(res.report.records) == len(rows) and res.images == 8
    assert sum(images_seen) == 8 and res.encodes == 8  # one tower pass per image for all its questions
    kinds = [r.gold_kind for r in rows]
    assert res.metrics == {"choice": kinds.count("choice"), "vqa": kinds.count("answers"),
                           "exact": kinds.count("answer")}
    counts = [r for r in res.report.records if r.family == "count"]
    assert {v for r in counts for v in r.scores.values()} <= {0.0, 0.6, 1.0}  # 2 of 10 humans: 0.6 (leave-one-out)


def test_data_matches_the_builtin_eval(tmp_path):
    exported = tmp_path / "exp"
    res = _run("--export-data", exported, "-n", "24", "--split", "test")
    assert res.exit_code == 0 and "wrote 24 questions" in res.stdout
    builtin, data = tmp_path / "b.json", tmp_path / "d.json"
    assert _run(*SHIPPED, "-n", "24", "--tokens", "1,9,144", "--json", builtin).exit_code == 0
    res = _run(*SHIPPED, "--data", exported / "test.jsonl", "--tokens", "1,9,144", "--json", data,
               "--plot", tmp_path / "acc.png", "--samples", tmp_path / "s.jsonl", "--tune")
    assert res.exit_code == 0, res.output
    a, b = json.loads(builtin.read_text()), json.loads(data.read_text())
    assert a["accuracy"] == b["accuracy"] and a["by_family"] == b["by_family"] and a["oracle"] == b["oracle"]
    assert b["encodes"] < b["n"] == 24 and b["metrics"] == {"exact": 24}
    assert "| **overall** |" in res.stdout and "| auto-scale t=0.9 |" in res.stdout and "pick:" in res.stdout
    assert "calibration (ECE" in res.stdout and (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    assert len(_lines(tmp_path / "s.jsonl")) == 24


def test_cli_one_line_errors(tmp_path, hand_data):
    cases = [
        (["--data", tmp_path / "nope.jsonl", "--model", tmp_path / "no-model"], "no such file"),
        (["--data", _write_jsonl(tmp_path / "x.csv", ["question,answer", "q,a"])], "no 'image' column"),
        (["--data", hand_data, "--resume"], "--resume needs --samples"),
        (["--metric", "vqa"], "--metric need(s) --data"),
        (["--data", hand_data, "--export-data", tmp_path / "e"], "does not go with --data"),
        (["--data", hand_data, "--split", "val"], "does not go with --data"),
        (["--data", hand_data, "--family", "zz"], "no rows of the families"),
        (["--export-data", hand_data], "is a file"),
    ]
    for args, message in cases:
        res = _run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)


def test_stdin_and_both_backends(tiny_model_dir, tmp_path, hand_data):
    rows = hand_data.read_text().replace('"img/', f'"{tmp_path}/img/')
    res = _run("--model", tiny_model_dir, "--data", "-", "--tokens", "1,576", "--json", tmp_path / "t.json",
               stdin=rows)
    assert res.exit_code == 0, res.output
    torch_report = json.loads((tmp_path / "t.json").read_text())
    assert torch_report["n"] == 5 and torch_report["backend"] == "torch"
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from m3cli.convert.gguf_writer import convert_to_gguf

    lm, _ = convert_to_gguf(tiny_model_dir, tmp_path / "gguf", "f32", name="tiny")
    res = _run("--model", lm, "--data", hand_data, "--tokens", "1,576", "--json", tmp_path / "g.json",
               "--samples", tmp_path / "g.jsonl")
    assert res.exit_code == 0, res.output
    gguf_report = json.loads((tmp_path / "g.json").read_text())
    assert gguf_report["n"] == 5 and gguf_report["backend"] == "llamacpp" and gguf_report["errors"]["count"] == 0
    assert gguf_report["images"] == 2 and gguf_report["encodes"] == 2
